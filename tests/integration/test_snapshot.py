"""Snapshots: the database's labels become dataset versions whose numbers the database
allocates; crashes resume; diff and lineage follow the annotations exactly."""

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from services import db
from services.config import Settings
from services.datasets.snapshot import (
    allocate_version,
    committed_versions,
    model_lineage,
    snapshot,
)
from services.datasets.store import DatasetStore, open_store
from services.datasets.versions import diff_versions, lineage, read_version
from services.errors import Conflict, NotFound
from services.models import DatasetVersion, Item, ItemStatus, ModelVersion, Project
from services.projects import ProjectSpec, create_project, get_project
from services.state import AnnotationInput, record_annotation, withdraw_annotation
from tests.integration.conftest import insert_row, unique_name

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def setup_project(session: Session, store_url: str, n_items: int = 4) -> Project:
    project = create_project(
        session,
        ProjectSpec(
            name=unique_name("snap"),
            labels=["ok", "defect"],
            modality="features",
            store_url=store_url,
        ),
    )
    for i in range(n_items):
        session.add(
            Item(
                project_id=project.id or 0,
                external_id=f"item-{i}",
                uri=f"file:///pool/{i}",
                content_hash=f"{i:064x}",
                status=ItemStatus.QUEUED,
                registered_from="test",
            )
        )
    session.flush()
    return project


def label(session: Session, project: Project, item: str, value: str, ext: str, minute: int) -> None:
    row = session.exec(
        select(Item).where(Item.project_id == project.id, Item.external_id == item)
    ).one()
    record_annotation(
        session,
        AnnotationInput(
            item_id=row.id or 0,
            label=value,
            source="label_studio",
            external_id=ext,
            updated_at=T0 + timedelta(minutes=minute),
            annotator="ann",
        ),
    )


def labels_of(store: DatasetStore, project: Project, version: int) -> dict[str, str]:
    _, table = read_version(store, project.name, version)
    return dict(zip(table["item_id"].to_pylist(), table["label"].to_pylist(), strict=True))


def test_snapshots_follow_labels_relabels_and_withdrawals(
    engine: sa.Engine, store_url: str, settings: Settings
) -> None:
    store = open_store(store_url, settings, create=True)
    with db.session_scope(engine) as session:
        project = setup_project(session, store_url)
        label(session, project, "item-0", "ok", "a0", 0)
        label(session, project, "item-1", "defect", "a1", 1)
        v1 = snapshot(session, project, settings=settings, store=store)
        assert (v1.version, v1.parent_version, v1.row_count) == (1, None, 2)
        assert labels_of(store, project, 1) == {"item-0": "ok", "item-1": "defect"}

        label(session, project, "item-1", "ok", "a1", 5)  # relabeled
        label(session, project, "item-2", "defect", "a2", 6)  # added
        withdraw_annotation(
            session, project_id=project.id or 0, source="label_studio", external_id="a0"
        )
        v2 = snapshot(session, project, settings=settings, store=store)
        assert (v2.version, v2.parent_version) == (2, 1)
        assert v2.class_counts == {"ok": 1, "defect": 1}
        result = diff_versions(store, project.name, 1, 2)
        assert result.added == ["item-2"]
        assert result.withdrawn == ["item-0"]
        assert [(r.item_id, r.old, r.new) for r in result.relabeled] == [("item-1", "defect", "ok")]
        assert lineage(store, project.name, 2) == [2, 1]
        assert [v.version for v in committed_versions(session, project)] == [1, 2]
        session.add(
            ModelVersion(
                project_id=project.id or 0,
                version=1,
                dataset_version=2,
                artifact_uri="file:///models/1",
                parameters={},
                metrics={},
            )
        )
        session.flush()
        assert model_lineage(session, project, 1) == [2, 1]
        with pytest.raises(NotFound, match="no model version 9"):
            model_lineage(session, project, 9)


class DatabaseCommitCrashError(Exception):
    pass


def test_crash_after_the_manifest_before_the_database_commit_is_adopted(
    engine: sa.Engine, tmp_path: object, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_url = f"file://{tmp_path}/store"
    store = open_store(store_url, settings, create=True)
    with db.session_scope(engine) as session:
        project = setup_project(session, store_url)
        label(session, project, "item-0", "ok", "a0", 0)
        name = project.name

    import services.datasets.snapshot as snapshot_module

    def crash(*args: object, **kwargs: object) -> None:
        raise DatabaseCommitCrashError

    with monkeypatch.context() as patch:
        patch.setattr(snapshot_module, "_commit_row", crash)
        with pytest.raises(DatabaseCommitCrashError), db.session_scope(engine) as session:
            snapshot(session, get_project(session, name), settings=settings, store=store)
    with db.session_scope(engine) as session:
        project = get_project(session, name)
        row = session.exec(
            select(DatasetVersion).where(DatasetVersion.project_id == project.id)
        ).one()
        assert (row.version, row.state) == (1, "allocated")
        # Labels changed after the crash: the committed manifest is adopted, not rewritten.
        label(session, project, "item-1", "defect", "a1", 1)
        resumed = snapshot(session, project, settings=settings, store=store)
        assert (resumed.version, resumed.state, resumed.row_count) == (1, "committed", 1)
        assert labels_of(store, project, 1) == {"item-0": "ok"}
        following = snapshot(session, project, settings=settings, store=store)
        assert (following.version, following.parent_version, following.row_count) == (2, 1, 2)


def test_version_numbers_are_unique_per_project_in_the_database(
    engine: sa.Engine, tmp_path: object
) -> None:
    with db.session_scope(engine) as session:
        project = setup_project(session, f"file://{tmp_path}/s")
        allocate_version(session, project)
    # A second writer that computed the same number cannot insert it.
    with pytest.raises(sa.exc.IntegrityError):
        insert_row(engine, DatasetVersion(project_id=project.id or 0, version=1))
    with db.session_scope(engine) as session:
        first = allocate_version(session, project)  # the pending allocation is resumed
        assert first.version == 1


def test_concurrent_allocation_conflicts(engine: sa.Engine, tmp_path: object) -> None:
    with db.session_scope(engine) as session:
        project = setup_project(session, f"file://{tmp_path}/s")
        session.add(DatasetVersion(project_id=project.id or 0, version=1, state="committed"))
    # Simulate the race: the other writer inserts version 2 after we read max = 1.
    with db.session_scope(engine) as session:
        original = session.exec
        calls = {"n": 0}

        def racing_exec(statement, *args, **kwargs):  # type: ignore[no-untyped-def]
            result = original(statement, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 3:  # after both max() queries
                with engine.begin() as other:
                    other.execute(
                        sa.insert(DatasetVersion).values(
                            project_id=project.id,
                            version=2,
                            state="allocated",
                            created_at=datetime.now(UTC),
                        )
                    )
            return result

        session.exec = racing_exec  # type: ignore[method-assign]
        with pytest.raises(Conflict, match="allocated by another writer"):
            allocate_version(session, project)
