"""Snapshot: commit the database's current labels as the project's next dataset version.

The version number is allocated by the database (a `DatasetVersion` row, unique per project)
before anything is written to the store; the row is marked committed after the manifest is in
place. A crash in between leaves an `allocated` row: the next snapshot resumes that number, and
if the manifest did reach the store it is adopted as is (the store is the truth about data).
"""

from datetime import datetime

import pyarrow as pa
import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from services.config import Settings
from services.datasets.store import DatasetStore, open_store, sha256_hex
from services.datasets.versions import (
    ITEMS_SCHEMA,
    CommitResult,
    Manifest,
    commit_version,
    manifest_key,
    read_manifest,
)
from services.errors import Conflict, NotFound
from services.models import (
    DatasetVersion,
    DatasetVersionState,
    Item,
    ModelVersion,
    Project,
    utcnow,
)

_LABELED_BATCH = 50_000


def labeled_items_table(session: Session, project: Project) -> pa.Table:
    """Every item of the project that has a label, ordered by item id, in `ITEMS_SCHEMA`."""
    columns: dict[str, list[object]] = {name: [] for name in ITEMS_SCHEMA.names}
    statement = (
        sa.select(
            col(Item.external_id),
            col(Item.uri),
            col(Item.content_hash),
            col(Item.label),
            col(Item.label_source),
            col(Item.annotator),
            col(Item.labeled_at),
        )
        .where(col(Item.project_id) == project.id, col(Item.label).is_not(None))
        .order_by(col(Item.external_id))
        .execution_options(yield_per=_LABELED_BATCH)
    )
    for row in session.execute(statement):
        for name, value in zip(ITEMS_SCHEMA.names, row, strict=True):
            columns[name].append(value if value is not None else "")
    return pa.table(columns, schema=ITEMS_SCHEMA)


def committed_versions(session: Session, project: Project) -> list[DatasetVersion]:
    return list(
        session.exec(
            select(DatasetVersion)
            .where(
                DatasetVersion.project_id == project.id,
                DatasetVersion.state == DatasetVersionState.COMMITTED,
            )
            .order_by(col(DatasetVersion.version))
        ).all()
    )


def get_version(session: Session, project: Project, version: int) -> DatasetVersion:
    row = session.exec(
        select(DatasetVersion).where(
            DatasetVersion.project_id == project.id, DatasetVersion.version == version
        )
    ).first()
    if row is None or row.state != DatasetVersionState.COMMITTED:
        raise NotFound(f"project {project.name!r} has no committed dataset version {version}")
    return row


def allocate_version(
    session: Session, project: Project, *, cycle_id: int | None = None
) -> DatasetVersion:
    """The project's allocated-but-uncommitted version if a crash left one, else a new number
    (max + 1). Two concurrent allocators of the same number cannot both insert: the unique
    constraint makes the loser raise Conflict."""
    pending = session.exec(
        select(DatasetVersion).where(
            DatasetVersion.project_id == project.id,
            DatasetVersion.state == DatasetVersionState.ALLOCATED,
        )
    ).first()
    if pending is not None:
        return pending
    highest = session.exec(
        select(func.max(DatasetVersion.version)).where(DatasetVersion.project_id == project.id)
    ).one()
    latest_committed = session.exec(
        select(func.max(DatasetVersion.version)).where(
            DatasetVersion.project_id == project.id,
            DatasetVersion.state == DatasetVersionState.COMMITTED,
        )
    ).one()
    row = DatasetVersion(
        project_id=project.id or 0,
        version=(highest or 0) + 1,
        parent_version=latest_committed,
        cycle_id=cycle_id,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except sa.exc.IntegrityError:
        raise Conflict(
            f"dataset version {(highest or 0) + 1} of {project.name!r} was allocated by "
            "another writer at the same time; retry"
        ) from None
    return row


def _mark_committed(
    session: Session, row: DatasetVersion, manifest: Manifest, key: str, sha256: str
) -> DatasetVersion:
    row.state = DatasetVersionState.COMMITTED
    row.manifest_key = key
    row.manifest_sha256 = sha256
    row.row_count = manifest.row_count
    row.class_counts = manifest.class_counts
    row.label_set_hash = manifest.label_set_hash
    row.committed_at = utcnow()
    session.add(row)
    session.flush()
    return row


def snapshot(
    session: Session,
    project: Project,
    *,
    settings: Settings,
    cycle_id: int | None = None,
    store: DatasetStore | None = None,
) -> DatasetVersion:
    """Commit the project's labels as a new dataset version and return its row.

    The allocation is committed to the database first, so the number survives a crash between
    the store write and the database commit (the retry then adopts the manifest).
    """
    store = store or open_store(project.store_url, settings, create=True)
    row = allocate_version(session, project, cycle_id=cycle_id)
    session.commit()
    key = manifest_key(project.name, row.version)
    if store.exists(key):
        manifest = read_manifest(store, project.name, row.version)
        return _commit_row(session, row, manifest, key, sha256_hex(store.get(key)))
    created_at: datetime = row.created_at
    result: CommitResult = commit_version(
        store,
        project=project.name,
        version=row.version,
        parent_version=row.parent_version,
        items=labeled_items_table(session, project),
        labels=project.labels,
        created_at=created_at,
        cycle_id=row.cycle_id,
    )
    return _commit_row(session, row, result.manifest, key, result.manifest_sha256)


def _commit_row(
    session: Session, row: DatasetVersion, manifest: Manifest, key: str, sha256: str
) -> DatasetVersion:
    committed = _mark_committed(session, row, manifest, key, sha256)
    session.commit()
    return committed


def model_lineage(session: Session, project: Project, model_version: int) -> list[int]:
    """The dataset versions behind a model, newest first: the version it was trained on, then
    that version's parent chain (from the database's commit records)."""
    model = session.exec(
        select(ModelVersion).where(
            ModelVersion.project_id == project.id, ModelVersion.version == model_version
        )
    ).first()
    if model is None:
        raise NotFound(f"project {project.name!r} has no model version {model_version}")
    chain: list[int] = []
    current: int | None = model.dataset_version
    while current is not None:
        if current in chain:
            raise Conflict(f"{project.name}: dataset parent chain loops at v{current}")
        chain.append(current)
        current = get_version(session, project, current).parent_version
    return chain
