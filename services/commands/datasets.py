"""`focalloop datasets ...`: versioned datasets in a store, with or without a database (the
services each command calls are imported inside it, so `--help` stays fast)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.commands.audited import audit_cli
from services.errors import InvalidInput

if TYPE_CHECKING:
    from services.datasets.store import DatasetStore

datasets_app = typer.Typer(
    help="Immutable dataset versions in a store (file:///dir or s3://bucket/prefix).",
    no_args_is_help=True,
)
console = Console()

StoreOption = Annotated[str, typer.Option("--store", help="file:///dir or s3://bucket/prefix")]
ProjectOption = Annotated[str, typer.Option("--project", help="Project name (the store folder).")]


def _store(url: str, *, create: bool = False) -> DatasetStore:
    from services.config import get_settings
    from services.datasets.store import open_store

    return open_store(url, get_settings(), create=create)


def _label_set(file_labels: list[str], given: str | None, parent: list[str] | None) -> list[str]:
    """The label set of a new version: --labels when given (it must extend the parent's), else
    the parent's with the file's new classes appended (sorted), else the file's (sorted)."""
    from services.projects import check_labels

    if given is not None:
        labels = check_labels([label.strip() for label in given.split(",") if label.strip()])
        if parent is not None and labels[: len(parent)] != parent:
            raise InvalidInput(
                f"--labels must keep the parent version's classes {parent} first, in order "
                "(classes may only be added)"
            )
        return labels
    base = list(parent or [])
    return base + sorted(set(file_labels) - set(base))


@datasets_app.command("commit")
def commit(
    store: StoreOption,
    project: ProjectOption,
    source: Annotated[
        Path, typer.Option("--from", help="CSV, JSONL or Parquet with item_id, uri, label.")
    ],
    labels: Annotated[
        str | None, typer.Option(help="Label set, comma separated (default: see docs).")
    ] = None,
    version: Annotated[
        int | None, typer.Option(min=1, help="Version number (default: latest + 1).")
    ] = None,
) -> None:
    """Commit a labeled items file as the next version (write-once; the parent is the latest)."""
    from services.datasets.tables import read_table_file
    from services.datasets.versions import (
        commit_version,
        list_versions,
        normalize_items,
        read_manifest,
    )
    from services.projects import check_project_name

    check_project_name(project)
    target = _store(store, create=True)
    existing = list_versions(target, project)
    number = version or (existing[-1] if existing else 0) + 1
    parent = max((v for v in existing if v < number), default=None)
    parent_labels = read_manifest(target, project, parent).label_set if parent else None
    raw = read_table_file(source)
    if "label" not in raw.column_names:
        raise InvalidInput(f"{source}: needs columns item_id, uri, label")
    file_labels = sorted({str(v) for v in raw.column("label").to_pylist() if v is not None})
    label_set = _label_set(file_labels, labels, parent_labels)
    now = datetime.now(UTC)
    items = normalize_items(raw, labels=label_set, now=now)
    result = commit_version(
        target,
        project=project,
        version=number,
        parent_version=parent,
        items=items,
        labels=label_set,
        created_at=now,
    )
    console.print(
        f"committed {project} v{number}: {items.num_rows} items, "
        f"{len(result.manifest.objects)} object(s) -> {target.describe(result.manifest_key)}"
    )


@datasets_app.command("snapshot")
def snapshot_command(
    name: Annotated[str, typer.Argument(help="Project name in the database.")],
) -> None:
    """Commit the database's current labels of a project as its next version."""
    from services.config import get_settings
    from services.datasets.snapshot import snapshot
    from services.db import engine_from_settings, session_scope
    from services.projects import get_project

    settings = get_settings()
    with session_scope(engine_from_settings(settings)) as session:
        project = get_project(session, name)
        row = snapshot(session, project, settings=settings)
        audit_cli(session, "dataset.snapshot", name, target=f"dataset:v{row.version}")
        console.print(
            f"committed {project.name} v{row.version}: {row.row_count} labeled items "
            f"(parent {row.parent_version}) in {project.store_url}"
        )


@datasets_app.command("list")
def list_command(store: StoreOption, project: ProjectOption) -> None:
    """Committed versions, oldest first."""
    from services.datasets.versions import list_versions, read_manifest
    from services.projects import check_project_name

    target = _store(store)
    table = Table("version", "parent", "items", "created", "classes", title=f"{project} datasets")
    for number in list_versions(target, check_project_name(project)):
        manifest = read_manifest(target, project, number)
        table.add_row(
            str(number),
            str(manifest.parent_version or "-"),
            str(manifest.row_count),
            manifest.created_at.isoformat(timespec="seconds"),
            ", ".join(f"{k}={v}" for k, v in manifest.class_counts.items()),
        )
    console.print(table)


@datasets_app.command("show")
def show(
    store: StoreOption,
    project: ProjectOption,
    version: Annotated[int | None, typer.Option(min=1, help="Default: the latest.")] = None,
) -> None:
    """A version's manifest (JSON) and its lineage."""
    from services.datasets.versions import latest_version, lineage, read_manifest
    from services.projects import check_project_name

    target = _store(store)
    number = version or latest_version(target, check_project_name(project))
    if number is None:
        raise InvalidInput(f"{project} has no committed versions in {store}")
    manifest = read_manifest(target, project, number)
    data = json.loads(manifest.model_dump_json())
    data["lineage"] = lineage(target, project, number)
    console.print_json(json.dumps(data))


@datasets_app.command("diff")
def diff(
    store: StoreOption,
    project: ProjectOption,
    a: Annotated[int, typer.Argument(help="Older version.")],
    b: Annotated[int, typer.Argument(help="Newer version.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the full diff as JSON.")] = False,
) -> None:
    """Items added, relabeled and withdrawn from version A to version B."""
    from services.datasets.versions import diff_versions
    from services.projects import check_project_name

    result = diff_versions(_store(store), check_project_name(project), a, b)
    if json_out:
        console.print_json(
            json.dumps(
                {
                    "a": a,
                    "b": b,
                    "added": result.added,
                    "withdrawn": result.withdrawn,
                    "relabeled": [vars(r) for r in result.relabeled],
                }
            )
        )
        return
    console.print(
        f"v{a} -> v{b}: {len(result.added)} added, {len(result.relabeled)} relabeled, "
        f"{len(result.withdrawn)} withdrawn"
    )
    for relabel in result.relabeled[:20]:
        console.print(f"  relabeled {relabel.item_id}: {relabel.old} -> {relabel.new}")


@datasets_app.command("verify")
def verify(
    store: StoreOption,
    project: ProjectOption,
    version: Annotated[int | None, typer.Option(min=1, help="Default: every version.")] = None,
) -> None:
    """Check every object's SHA-256 against the manifests; exit 1 if anything is wrong."""
    from services.datasets.versions import list_versions, verify_version
    from services.projects import check_project_name

    target = _store(store)
    numbers = [version] if version else list_versions(target, check_project_name(project))
    if not numbers:
        raise InvalidInput(f"{project} has no committed versions in {store}")
    failed = False
    for number in numbers:
        report = verify_version(target, project, number)
        if report.ok:
            console.print(f"{project} v{number}: ok")
        else:
            failed = True
            for problem in report.problems:
                console.print(f"[bold red]{project} v{number}: {problem}[/]", highlight=False)
    if failed:
        raise typer.Exit(1)


@datasets_app.command("export")
def export(
    store: StoreOption,
    project: ProjectOption,
    version: Annotated[int, typer.Option(min=1)],
    to: Annotated[Path, typer.Option("--to", help="Output .csv, .jsonl or .parquet file.")],
) -> None:
    """Write a version's items (hashes verified) to a file."""
    from services.datasets.tables import write_table_file
    from services.datasets.versions import read_version
    from services.projects import check_project_name

    _, table = read_version(_store(store), check_project_name(project), version)
    write_table_file(table, to)
    console.print(f"exported {project} v{version}: {table.num_rows} items -> {to}")
