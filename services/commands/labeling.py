"""`focalloop labelstudio connect|sync|push|status` and `focalloop api` (each command imports
what it calls, so `--help` stays fast)."""

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.commands.audited import audit_cli
from services.commands.state import engine_for
from services.errors import FocalloopError

labelstudio_app = typer.Typer(
    help="Connect projects to Label Studio and reconcile their answers.", no_args_is_help=True
)
console = Console()


@labelstudio_app.command("connect")
def connect(
    name: Annotated[str, typer.Argument(help="The focalloop project.")],
    url: Annotated[str, typer.Option(help="Label Studio's URL, e.g. http://127.0.0.1:8080.")],
    token_env: Annotated[
        str, typer.Option(help="Environment variable holding the Label Studio API token.")
    ] = "LABEL_STUDIO_TOKEN",
    media: Annotated[
        str, typer.Option(help="auto | api | presigned: how tasks link to images.")
    ] = "auto",
    review_threshold: Annotated[
        float | None,
        typer.Option(
            help="Send a label to review when its cross-fitted probability is below this "
            "(default 0.05)."
        ),
    ] = None,
    reviews_per_cycle: Annotated[
        int | None,
        typer.Option(min=0, help="At most this many review tasks per cycle (default 20)."),
    ] = None,
) -> None:
    """Make Label Studio the project's labeler (label config, webhook, hardest-first view).
    Safe to repeat: the Label Studio project and its webhook are reused."""
    from labeling.label_studio.bucket_cors import bucket_cors_problems
    from labeling.label_studio.link import (
        DEFAULT_REVIEW_THRESHOLD,
        DEFAULT_REVIEWS_PER_CYCLE,
        webhook_url,
    )
    from labeling.label_studio.link import connect as connect_project
    from services.config import get_settings
    from services.db import session_scope
    from services.projects import get_project

    settings = get_settings()
    with session_scope(engine_for(settings)) as session:
        link = connect_project(
            session,
            name,
            url=url,
            token_env=token_env,
            settings=settings,
            media=media,
            review_threshold=(
                DEFAULT_REVIEW_THRESHOLD if review_threshold is None else review_threshold
            ),
            reviews_per_cycle=(
                DEFAULT_REVIEWS_PER_CYCLE if reviews_per_cycle is None else reviews_per_cycle
            ),
        )
        audit_cli(
            session,
            "labelstudio.connect",
            name,
            detail={"url": url, "label_studio_project": link.project_id, "media": media},
        )
    with session_scope(engine_for(settings)) as session:
        try:
            problems = bucket_cors_problems(session, get_project(session, name), link, settings)
        except FocalloopError as error:  # connected all the same: the check only advises
            problems = [f"the image buckets' CORS rules could not be checked: {error}"]
    console.print(
        f"{name}: Label Studio project {link.project_id} at {link.url}/projects/{link.project_id} "
        f"(webhook {link.webhook_id} -> {webhook_url(settings, name)}, "
        f"view {link.view_id} orders tasks hardest first)"
    )
    for problem in problems:
        console.print(f"[bold yellow]warning:[/] {problem}")


@labelstudio_app.command("sync")
def sync(name: Annotated[str, typer.Argument(help="The focalloop project.")]) -> None:
    """Reconcile every answer with Label Studio now (beat does this on a schedule)."""
    from labeling.label_studio.sync import sync_annotations
    from services.config import get_settings
    from services.db import session_scope

    settings = get_settings()
    engine = engine_for(settings)
    report = sync_annotations(engine, name, settings)
    with session_scope(engine) as session:
        audit_cli(
            session,
            "labelstudio.sync",
            name,
            detail={"taken_in": report.new_revisions, "withdrawn": report.withdrawn},
        )
    console.print(
        f"{name}: {report.tasks_seen} tasks, {report.new_revisions} answers taken in, "
        f"{report.withdrawn} withdrawn, {report.rejected} rejected"
    )


@labelstudio_app.command("push")
def push(name: Annotated[str, typer.Argument(help="The focalloop project.")]) -> None:
    """Create the project's pending tasks in Label Studio now (what a hand-off does)."""
    from labeling.label_studio.tasks import push_pending
    from services.config import get_settings
    from services.db import session_scope

    settings = get_settings()
    engine = engine_for(settings)
    report = push_pending(engine, name, settings)
    with session_scope(engine) as session:
        audit_cli(session, "labelstudio.push", name, detail={"created": report.created})
    console.print(f"{name}: {report.created} tasks created, {report.adopted} found already there")


@labelstudio_app.command("status")
def status(name: Annotated[str, typer.Argument(help="The focalloop project.")]) -> None:
    """Tasks by kind and state, flagged items and the latest rejected answers."""
    from sqlmodel import col, func, select

    from labeling.label_studio.link import LabelStudioLink
    from services.db import session_scope
    from services.models import Item, LabelTask
    from services.projects import get_project
    from services.status import rejected_events

    with session_scope(engine_for()) as session:
        project = get_project(session, name)
        link = LabelStudioLink.of(project)
        counts = session.exec(
            select(LabelTask.kind, LabelTask.state, func.count())
            .where(LabelTask.project_id == project.id)
            .group_by(col(LabelTask.kind), col(LabelTask.state))
        ).all()
        flagged = session.exec(
            select(Item.external_id, Item.label_issue)
            .where(Item.project_id == project.id, col(Item.label_issue).is_not(None))
            .limit(20)
        ).all()
        rejected = rejected_events(session, project, newest=10)
    console.print(
        f"{name}: Label Studio project {link.project_id} at {link.url}; "
        f"last sync {link.last_sync_at or 'never'}"
    )
    table = Table("kind", "state", "tasks")
    for kind, state, count in counts:
        table.add_row(kind, state, str(count))
    console.print(table)
    for external_id, issue in flagged:
        console.print(f"flagged {external_id}: {issue}")
    for event in rejected:
        console.print(f"rejected event {event.event_id} ({event.received_at:%F %T}): {event.error}")


def api(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
    access_log: Annotated[
        bool | None,
        typer.Option(
            help="Log every request, query values redacted (costs about 3% of the webhook "
            "path's CPU); default FOCALLOOP_ACCESS_LOG, off."
        ),
    ] = None,
) -> None:
    """Serve the HTTP API (webhooks, media links, status) with uvicorn."""
    import os

    import uvicorn

    from services.config import get_settings

    if access_log is not None:
        # The app factory runs in each uvicorn worker process and reads the environment.
        os.environ["FOCALLOOP_ACCESS_LOG"] = "true" if access_log else "false"
        get_settings.cache_clear()
    access_log = get_settings().access_log
    uvicorn.run(
        "services.api.app:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=access_log,
        log_level=get_settings().log_level.lower(),
        log_config=None,  # the app configures logging (JSON lines by default) in each process
    )
