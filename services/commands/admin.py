"""`focalloop token ...` and `focalloop model ...`: API tokens and model promotion from the
command line (the person at the terminal acts as `cli:<user>` in the audit log)."""

import json
from datetime import datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.commands.audited import cli_actor
from services.commands.state import engine_for
from services.errors import InvalidInput

token_app = typer.Typer(help="API tokens (read, write, admin).", no_args_is_help=True)
model_app = typer.Typer(help="A project's models: list, promote, roll back.", no_args_is_help=True)
console = Console()


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="What the token is for.")],
    scope: Annotated[str, typer.Option(help="read, write or admin.")] = "read",
    project: Annotated[str | None, typer.Option(help="Restrict it to this project.")] = None,
    expires: Annotated[
        str | None, typer.Option(help="Expiry, ISO 8601 with a zone (2027-01-01T00:00:00Z).")
    ] = None,
) -> None:
    """Create a token and print its secret (shown this once; only its hash is stored)."""
    from services.auth import create_token
    from services.db import session_scope

    expires_at = None
    if expires is not None:
        try:
            expires_at = datetime.fromisoformat(expires)
        except ValueError:
            raise InvalidInput(f"--expires {expires!r} is not an ISO 8601 time") from None
    with session_scope(engine_for()) as session:
        view, secret = create_token(
            session,
            name=name,
            scope=scope,
            actor=cli_actor(),
            project=project,
            expires_at=expires_at,
        )
    console.print(f"token {view.id} ({view.scope}{', ' + project if project else ''}) created:")
    print(secret)


@token_app.command("list")
def token_list(
    include_revoked: Annotated[bool, typer.Option("--all", help="Show revoked ones too.")] = False,
) -> None:
    """Tokens (never their secrets)."""
    from services.auth import list_tokens
    from services.db import session_scope

    table = Table("id", "name", "scope", "project", "expires", "revoked", "last used")
    with session_scope(engine_for()) as session:
        for view in list_tokens(session, include_revoked=include_revoked):
            table.add_row(
                str(view.id),
                view.name,
                view.scope,
                view.project or "all",
                view.expires_at.isoformat() if view.expires_at else "never",
                view.revoked_at.isoformat() if view.revoked_at else "",
                view.last_used_at.isoformat() if view.last_used_at else "",
            )
    console.print(table)


@token_app.command("revoke")
def token_revoke(token_id: int) -> None:
    """Revoke a token: it authenticates no more (the record stays)."""
    from services.auth import revoke_token
    from services.db import session_scope

    with session_scope(engine_for()) as session:
        view = revoke_token(session, token_id, actor=cli_actor())
    console.print(f"token {view.id} ({view.name}) revoked")


@model_app.command("list")
def model_list(
    name: str, json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """The project's models, newest first: promotion decision and headline figures."""
    from services.db import session_scope
    from services.projects import get_project
    from services.status import headline_report, is_imbalanced, list_models

    with session_scope(engine_for()) as session:
        rows = []
        for model in list_models(session, get_project(session, name)):
            which, report = headline_report(model.metrics)
            rows.append(
                {
                    "version": model.version,
                    "dataset_version": model.dataset_version,
                    "promotion": model.promotion,
                    "reason": model.promotion_reason,
                    "evaluated_on": which,
                    "macro_f1": report["macro_f1"] if report else None,
                    # A balanced project has no minority to speak of.
                    "minority_recall": report["minority_recall"]
                    if report and is_imbalanced(model.metrics.get("class_counts"))
                    else None,
                }
            )
    if json_out:
        console.print_json(json.dumps(rows))
        return
    table = Table("model", "data", "promotion", "macro-F1", "minority recall", "on", "reason")
    for row in rows:
        table.add_row(
            f"m{row['version']}",
            f"v{row['dataset_version']}",
            str(row["promotion"]),
            f"{row['macro_f1']:.3f}" if row["macro_f1"] is not None else "-",
            f"{row['minority_recall']:.3f}" if row["minority_recall"] is not None else "-",
            str(row["evaluated_on"] or "-"),
            str(row["reason"] or ""),
        )
    console.print(table)


@model_app.command("promote")
def model_promote(name: str, version: int) -> None:
    """Make model VERSION current by hand (over a gate rejection); audited."""
    from services.db import session_scope
    from services.promotion import make_current

    with session_scope(engine_for()) as session:
        make_current(session, name, version, actor=cli_actor(), action="model.promote")
    console.print(f"{name}: m{version} is current")


@model_app.command("rollback")
def model_rollback(name: str, version: int) -> None:
    """Return to the earlier model VERSION; the current one is retired; audited."""
    from services.db import session_scope
    from services.promotion import make_current

    with session_scope(engine_for()) as session:
        make_current(session, name, version, actor=cli_actor(), action="model.rollback")
    console.print(f"{name}: rolled back to m{version}")
