"""`focalloop db|project|pool ...`: the state database from the command line.

Command modules import the services they call inside each command: `focalloop --help` and
`focalloop version` load only these definitions, not torch or the database layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.commands.audited import audit_cli
from services.errors import InvalidInput

if TYPE_CHECKING:
    import sqlalchemy as sa

    from services.config import Settings

db_app = typer.Typer(help="The state database (SQLite file or PostgreSQL).", no_args_is_help=True)
project_app = typer.Typer(help="Labeling projects.", no_args_is_help=True)
pool_app = typer.Typer(help="A project's pool of items.", no_args_is_help=True)

console = Console()


def _split(labels: str) -> list[str]:
    return [label.strip() for label in labels.split(",") if label.strip()]


def engine_for(settings: Settings | None = None) -> sa.Engine:
    from services.config import get_settings
    from services.db import engine_from_settings

    return engine_from_settings(settings or get_settings())


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the newest revision (safe to repeat)."""
    from services.db import current_revision, head_revision
    from services.db import upgrade as upgrade_database

    engine = engine_for()
    upgrade_database(engine)
    console.print(f"database at revision {current_revision(engine)} (head {head_revision()})")


@db_app.command("current")
def db_current() -> None:
    """Print the database's schema revision and the newest one this code ships."""
    from services.db import current_revision, head_revision

    console.print(f"current {current_revision(engine_for())}, head {head_revision()}")


@project_app.command("create")
def project_create(
    name: Annotated[str, typer.Argument(help="3-40 lowercase letters, digits, hyphens.")],
    labels: Annotated[str, typer.Option(help="Class names, comma separated, in index order.")],
    modality: Annotated[str, typer.Option(help="features or image.")],
    store: Annotated[str, typer.Option(help="Dataset store: file:///dir or s3://bucket/prefix.")],
    image_size: Annotated[int, typer.Option(help="Images are resized to this side.")] = 32,
    image_channels: Annotated[int, typer.Option(help="1 grayscale, 3 RGB.")] = 1,
    gamma: Annotated[float | None, typer.Option(help="Focal gamma (default 2).")] = None,
    alpha: Annotated[
        str | None, typer.Option(help="none, inverse_frequency or effective_number.")
    ] = None,
    strategy: Annotated[str | None, typer.Option(help="Acquisition strategy name.")] = None,
    batch_size: Annotated[int, typer.Option(help="Items handed off per cycle.")] = 50,
    label_budget: Annotated[int | None, typer.Option(help="Stop after this many labels.")] = None,
    retrain_min_new_labels: Annotated[int, typer.Option(help="Retrain after this many.")] = 100,
    retrain_cron: Annotated[str | None, typer.Option(help="Also retrain on this cron.")] = None,
    refill_below: Annotated[
        int | None,
        typer.Option(
            min=0, help="Start a cycle under this many open tasks (0: off; default: a batch)."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, help="Every random choice of its cycles derives from it.")
    ] = 0,
) -> None:
    """Create a project."""
    from services.db import session_scope
    from services.projects import ProjectSpec, create_project
    from services.recipe import default_recipe

    loss = default_recipe().loss.to_dict()
    if gamma is not None:
        loss["gamma"] = gamma
    if alpha is not None:
        loss["alpha"] = None if alpha == "none" else alpha
    selection = {"strategy": strategy} if strategy else None
    if modality not in ("features", "image"):
        raise InvalidInput(f"--modality must be features or image, got {modality!r}")
    spec = ProjectSpec(
        name=name,
        labels=_split(labels),
        modality=modality,  # type: ignore[arg-type]
        store_url=store,
        image_size=image_size,
        image_channels=image_channels,
        loss=loss,
        selection=selection,
        batch_size=batch_size,
        label_budget=label_budget,
        retrain_min_new_labels=retrain_min_new_labels,
        retrain_cron=retrain_cron,
        refill_below=refill_below,
        seed=seed,
    )
    with session_scope(engine_for()) as session:
        project = create_project(session, spec)
        audit_cli(session, "project.create", project.name)
        console.print(f"created project {project.name} ({len(project.labels)} classes)")


@project_app.command("update")
def project_update(
    name: str,
    labels: Annotated[
        str | None, typer.Option(help="The full new label set; classes may only be added.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    label_budget: Annotated[int | None, typer.Option()] = None,
    retrain_min_new_labels: Annotated[int | None, typer.Option()] = None,
    retrain_cron: Annotated[str | None, typer.Option()] = None,
    refill_below: Annotated[int | None, typer.Option(min=0, help="0: off.")] = None,
    seed: Annotated[int | None, typer.Option(min=0)] = None,
    unset: Annotated[
        list[str] | None,
        typer.Option(help="Remove a setting: label_budget or retrain_cron (repeatable)."),
    ] = None,
) -> None:
    """Change a project's settings."""
    from services.db import session_scope
    from services.projects import update_project

    with session_scope(engine_for()) as session:
        project = update_project(
            session,
            name,
            labels=_split(labels) if labels is not None else None,
            batch_size=batch_size,
            label_budget=label_budget,
            retrain_min_new_labels=retrain_min_new_labels,
            retrain_cron=retrain_cron,
            refill_below=refill_below,
            seed=seed,
            clear=unset or (),
        )
        changes = {
            "labels": _split(labels) if labels is not None else None,
            "batch_size": batch_size,
            "label_budget": label_budget,
            "retrain_min_new_labels": retrain_min_new_labels,
            "retrain_cron": retrain_cron,
            "refill_below": refill_below,
            "seed": seed,
        }
        detail = {key: value for key, value in changes.items() if value is not None}
        audit_cli(session, "project.update", name, detail=detail | dict.fromkeys(unset or ()))
        console.print(f"updated project {project.name}: labels {', '.join(project.labels)}")


@project_app.command("list")
def project_list() -> None:
    """Every project, by name."""
    from services.db import session_scope
    from services.projects import list_projects

    table = Table("name", "modality", "classes", "store", "paused")
    with session_scope(engine_for()) as session:
        for project in list_projects(session):
            table.add_row(
                project.name,
                project.modality,
                str(len(project.labels)),
                project.store_url,
                "yes" if project.paused else "no",
            )
    console.print(table)


@project_app.command("show")
def project_show(name: str) -> None:
    """A project's settings and its pool counts."""
    from services.db import session_scope
    from services.projects import get_project, pool_counts

    with session_scope(engine_for()) as session:
        project = get_project(session, name)
        counts = pool_counts(session, project)
        table = Table("setting", "value", title=f"project {project.name}")
        rows = {
            "labels": ", ".join(project.labels),
            "modality": project.modality
            + (
                f" ({project.image_channels}x{project.image_size}x{project.image_size})"
                if project.modality == "image"
                else f" (d={project.feature_dim})"
            ),
            "store": project.store_url,
            "loss": str(project.loss_config),
            "selection": str(project.selection_config),
            "batch size": str(project.batch_size),
            "label budget": str(project.label_budget or "none"),
            "retrain after new labels": str(project.retrain_min_new_labels),
            "retrain cron": project.retrain_cron or "none",
            "refill below open tasks": str(project.refill_below or "off"),
            "paused": "yes" if project.paused else "no",
            "seed": str(project.seed),
            "items": str(counts.total),
        }
        for key, value in rows.items():
            table.add_row(key, value)
    console.print(table)


@pool_app.command("add")
def pool_add(
    name: Annotated[str, typer.Argument(help="Project name.")],
    source: Annotated[
        str,
        typer.Option(
            "--from",
            help="Folder of images (local or s3://bucket/prefix), a manifest "
            "(.csv/.jsonl/.parquet: item_id, uri[, label]) or an .npz of features.",
        ),
    ],
) -> None:
    """Register a source's items in a project's pool (deduplicated by content)."""
    from services.config import get_settings
    from services.datasets.pool import add_to_pool
    from services.db import session_scope
    from services.projects import get_project

    settings = get_settings()
    # The person at the terminal can read the source they name: it is trusted along with the
    # configured roots (the API trusts only the configured roots).
    trusted = [*settings.source_roots, _source_root(source)]
    with session_scope(engine_for(settings)) as session:
        project = get_project(session, name, for_update=True)
        report = add_to_pool(session, project, source, settings=settings, trusted_roots=trusted)
        audit_cli(
            session,
            "pool.add",
            name,
            target=source,
            detail={"added": report.added, "duplicates": report.duplicates},
        )
    console.print(
        f"{report.source}: {report.seen} seen, {report.added} added "
        f"({report.seed_labels} with seed labels, {report.unreadable} unreadable), "
        f"{report.duplicates} duplicates skipped, {len(report.shards)} shard(s) written"
    )


def _source_root(source: str) -> str:
    """The folder (or S3 prefix) a CLI source lives in: a file's parent, a folder itself."""
    if "://" not in source:
        path = Path(source).expanduser().resolve()
        return "file://" + str(path if path.is_dir() else path.parent)
    if source.startswith("s3://"):
        stripped = source.rstrip("/")
        last = stripped.rsplit("/", 1)[-1]
        if "." in last and stripped.count("/") > 2:
            return stripped.rsplit("/", 1)[0]
        return stripped
    if source.startswith("file://"):
        path = Path(source[len("file://") :])
        return "file://" + str(path if path.is_dir() else path.parent)
    return source


@pool_app.command("show")
def pool_show(name: str) -> None:
    """Items of a project by status."""
    from services.db import session_scope
    from services.projects import get_project, pool_counts

    with session_scope(engine_for()) as session:
        counts = pool_counts(session, get_project(session, name))
    table = Table("status", "items", title=f"pool of {name}")
    for status, count in counts.by_status.items():
        table.add_row(status, str(count))
    table.add_row("total", str(counts.total))
    table.add_row("annotators disagree", str(counts.disagreements))
    console.print(table)
