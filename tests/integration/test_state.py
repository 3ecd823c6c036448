"""State on SQLite and PostgreSQL: migrations, projects, item and cycle status machines,
annotations and labels."""

from datetime import UTC, datetime, timedelta
from itertools import product
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import Session, SQLModel, col, select

from services import db
from services.errors import Conflict, IllegalTransition, InvalidInput, NotFound
from services.models import (
    CYCLE_TRANSITIONS,
    ITEM_TRANSITIONS,
    Annotation,
    Cycle,
    CycleState,
    Item,
    ItemStatus,
    Project,
)
from services.projects import (
    ProjectSpec,
    create_project,
    extend_labels,
    get_project,
    pool_counts,
    update_project,
)
from services.state import (
    AnnotationInput,
    create_cycle,
    record_annotation,
    transition_cycle,
    transition_item,
    transition_items,
    withdraw_annotation,
)
from tests.integration.conftest import insert_row, unique_name

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def make_project(session: Session, labels: tuple[str, ...] = ("ok", "defect")) -> Project:
    return create_project(
        session,
        ProjectSpec(
            name=unique_name("p"),
            labels=labels,
            modality="features",
            store_url="file:///tmp/unused-store",
        ),
    )


def make_item(session: Session, project: Project, status: ItemStatus) -> Item:
    item = Item(
        project_id=project.id or 0,
        external_id=unique_name("item"),
        uri="file:///tmp/x",
        content_hash=unique_name("hash"),
        status=status,
        registered_from="test",
    )
    session.add(item)
    session.flush()
    return item


def answer(
    item: Item, label: str | None, *, annotator: str = "ann", ext: str = "1", minutes: int = 0
) -> AnnotationInput:
    return AnnotationInput(
        item_id=item.id or 0,
        label=label,
        source="label_studio",
        external_id=ext,
        updated_at=T0 + timedelta(minutes=minutes),
        annotator=annotator,
        cancelled=label is None,
    )


def test_migrations_match_the_models_and_are_idempotent(engine: sa.Engine) -> None:
    db.upgrade(engine)  # a second upgrade changes nothing
    assert db.current_revision(engine) == db.head_revision()
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: object) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path}/x.db", busy_timeout_ms=4321)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 4321
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_database_urls_are_normalized() -> None:
    assert db.normalize_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    with pytest.raises(InvalidInput, match="unsupported database URL"):
        db.normalize_url("mysql://u@h/d")


@pytest.mark.parametrize("name", ["ab", "A-b-c", "-abc", "abc-", "a_b_c", "a" * 41, "ab c"])
def test_project_names_must_be_slugs(engine: sa.Engine, name: str) -> None:
    with db.session_scope(engine) as session, pytest.raises(InvalidInput, match="project name"):
        create_project(
            session,
            ProjectSpec(name=name, labels=["a", "b"], modality="image", store_url="file:///t"),
        )


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["a"], "at least two"),
        (["a", "a"], "repeat"),
        (["a", "b,c"], "invalid class"),
        (["a", " b"], "invalid class"),
        (["a", ""], "invalid class"),
    ],
)
def test_bad_label_sets_are_refused(engine: sa.Engine, labels: list[str], message: str) -> None:
    with db.session_scope(engine) as session, pytest.raises(InvalidInput, match=message):
        create_project(
            session,
            ProjectSpec(
                name=unique_name("p"), labels=labels, modality="image", store_url="file:///t"
            ),
        )


def test_project_settings_are_checked(engine: sa.Engine) -> None:
    base: dict[str, Any] = {"labels": ["a", "b"], "modality": "features", "store_url": "file:///t"}
    bad: list[tuple[dict[str, Any], str]] = [
        ({"store_url": "http://x/y"}, "only file"),
        ({"modality": "audio"}, "modality"),
        ({"selection": {"strategy": "nope"}}, "unknown strategy"),
        ({"loss": {"gamma": -1.0}}, "invalid loss"),
        ({"batch_size": 0}, "batch_size"),
        ({"retrain_cron": "every day"}, "cron"),
    ]
    for change, message in bad:
        with db.session_scope(engine) as session, pytest.raises(InvalidInput, match=message):
            create_project(session, ProjectSpec(name=unique_name("p"), **{**base, **change}))


def test_a_taken_project_name_conflicts(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        project = make_project(session)
    with db.session_scope(engine) as session, pytest.raises(Conflict, match="already exists"):
        create_project(
            session,
            ProjectSpec(
                name=project.name, labels=["a", "b"], modality="image", store_url="file:///t"
            ),
        )
    with db.session_scope(engine) as session, pytest.raises(NotFound, match="no project"):
        get_project(session, unique_name("missing"))


def test_label_sets_may_grow_but_never_lose_rename_or_reorder(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        name = make_project(session).name
    with db.session_scope(engine) as session:
        assert extend_labels(session, name, ["ok", "defect", "scratch"]).labels == [
            "ok",
            "defect",
            "scratch",
        ]
    for labels, message in [
        (["ok", "scratch"], "cannot remove or rename"),
        (["ok", "defekt", "scratch"], "cannot remove or rename"),
        (["defect", "ok", "scratch"], "cannot reorder"),
    ]:
        with db.session_scope(engine) as session, pytest.raises(InvalidInput, match=message):
            extend_labels(session, name, labels)
    with db.session_scope(engine) as session:
        assert get_project(session, name).labels == ["ok", "defect", "scratch"]
        update_project(session, name, batch_size=7, retrain_cron="0 */6 * * *")
    with db.session_scope(engine) as session:
        project = get_project(session, name)
        assert (project.batch_size, project.retrain_cron) == (7, "0 */6 * * *")


ALL_PAIRS = list(product(ItemStatus, ItemStatus))


@pytest.mark.parametrize(("current", "target"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
def test_item_transitions_follow_the_table(
    engine: sa.Engine, current: ItemStatus, target: ItemStatus
) -> None:
    with db.session_scope(engine) as session:
        item = make_item(session, make_project(session), current)
        if target in ITEM_TRANSITIONS[current]:
            assert transition_item(session, item.id or 0, target).status == target
        else:
            with pytest.raises(IllegalTransition, match=f"{current} -> {target}"):
                transition_item(session, item.id or 0, target)
            assert session.get(Item, item.id).status == current  # type: ignore[union-attr]


def test_bulk_transition_is_all_or_nothing(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        project = make_project(session)
        a = make_item(session, project, ItemStatus.SELECTED)
        b = make_item(session, project, ItemStatus.UNLABELED)  # moved on by someone else
        ids = [a.id or 0, b.id or 0]
        with (
            pytest.raises(Conflict, match="1 of 2 items were not selected"),
            session.begin_nested(),
        ):
            transition_items(session, ids, ItemStatus.QUEUED, expected=ItemStatus.SELECTED)
        statuses = session.exec(select(Item.status).where(Item.id.in_(ids))).all()  # type: ignore[union-attr]
        assert sorted(statuses) == ["selected", "unlabeled"]
        assert (
            transition_items(session, [ids[0]], ItemStatus.QUEUED, expected=ItemStatus.SELECTED)
            == 1
        )


def test_a_stale_writer_cannot_overwrite_a_concurrent_status_change(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        item_id = make_item(session, make_project(session), ItemStatus.SELECTED).id or 0
    with db.session_scope(engine) as first:
        transition_items(first, [item_id], ItemStatus.QUEUED, expected=ItemStatus.SELECTED)
    # A second writer that still believes the item is selected moves nothing.
    with db.session_scope(engine) as second, pytest.raises(Conflict):
        transition_items(second, [item_id], ItemStatus.UNLABELED, expected=ItemStatus.SELECTED)
    with db.session_scope(engine) as session:
        assert session.get(Item, item_id).status == "queued"  # type: ignore[union-attr]


def test_newest_live_answer_is_the_label_and_every_answer_is_kept(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        item = make_item(session, make_project(session), ItemStatus.QUEUED)
        assert record_annotation(session, answer(item, "ok", minutes=0)) is not None
        assert (item.status, item.label) == ("labeled", "ok")
        # An update of the same annotation is a new revision; the newest wins.
        record_annotation(session, answer(item, "defect", minutes=5))
        session.refresh(item)
        assert item.label == "defect"
        assert (item.n_annotators, item.disagreement) == (1, False)
        # The same revision delivered again stores nothing.
        assert record_annotation(session, answer(item, "defect", minutes=5)) is None
        rows = session.exec(select(Annotation).where(Annotation.item_id == item.id)).all()
        assert [r.label for r in rows] == ["ok", "defect"]


def test_out_of_order_revisions_keep_the_newest(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        item = make_item(session, make_project(session), ItemStatus.QUEUED)
        record_annotation(session, answer(item, "defect", minutes=9))
        record_annotation(session, answer(item, "ok", minutes=1))  # older, arrives late
        session.refresh(item)
        assert item.label == "defect"


def test_disagreement_between_annotators_is_recorded_and_counted(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        project = make_project(session)
        item = make_item(session, project, ItemStatus.QUEUED)
        record_annotation(session, answer(item, "ok", annotator="ann", ext="1"))
        record_annotation(session, answer(item, "defect", annotator="bob", ext="2", minutes=1))
        session.refresh(item)
        assert (item.label, item.n_annotators, item.disagreement) == ("defect", 2, True)
        assert pool_counts(session, project).disagreements == 1
        # Bob's answer withdrawn: Ann's label stands, no disagreement left.
        assert (
            withdraw_annotation(
                session, project_id=project.id or 0, source="label_studio", external_id="2"
            )
            == 1
        )
        session.refresh(item)
        assert (item.label, item.status, item.disagreement) == ("ok", "labeled", False)
        # Withdrawing the last label returns the item to unlabeled; repeats change nothing.
        withdraw_annotation(
            session, project_id=project.id or 0, source="label_studio", external_id="1"
        )
        assert (
            withdraw_annotation(
                session, project_id=project.id or 0, source="label_studio", external_id="1"
            )
            == 0
        )
        session.refresh(item)
        assert (item.label, item.status) == (None, "unlabeled")
        assert len(session.exec(select(Annotation).where(Annotation.item_id == item.id)).all()) == 2


def test_cancelled_answers_give_no_label(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        item = make_item(session, make_project(session), ItemStatus.QUEUED)
        assert record_annotation(session, answer(item, None)) is not None
        session.refresh(item)
        assert (item.status, item.label) == ("queued", None)


def test_unknown_labels_and_unreadable_items_are_refused_and_nothing_is_stored(
    engine: sa.Engine,
) -> None:
    with db.session_scope(engine) as session:
        project = make_project(session)
        item = make_item(session, project, ItemStatus.QUEUED)
        with pytest.raises(InvalidInput, match="not in project"):
            record_annotation(session, answer(item, "cat"))
        broken = make_item(session, project, ItemStatus.UNREADABLE)
        with pytest.raises(IllegalTransition):
            record_annotation(session, answer(broken, "ok"))
        count = session.exec(
            select(sa.func.count())
            .select_from(Annotation)
            .where(Annotation.project_id == project.id)
        ).one()
        assert count == 0
        session.refresh(item)
        assert item.status == "queued"


CYCLE_PAIRS = list(product(CycleState, CycleState))


@pytest.mark.parametrize(
    ("current", "target"), CYCLE_PAIRS, ids=[f"{a}->{b}" for a, b in CYCLE_PAIRS]
)
def test_cycle_transitions_follow_the_table(
    engine: sa.Engine, current: CycleState, target: CycleState
) -> None:
    with db.session_scope(engine) as session:
        project = make_project(session)
        cycle = Cycle(project_id=project.id or 0, number=1, trigger="test", state=current)
        session.add(cycle)
        session.flush()
        if target in CYCLE_TRANSITIONS[current]:
            moved = transition_cycle(session, cycle.id or 0, target, reason="because")
            assert moved.state == target
            assert moved.timeline[-1]["state"] == target
            assert (moved.finished_at is not None) == (target in ("done", "failed", "cancelled"))
        else:
            with pytest.raises(IllegalTransition):
                transition_cycle(session, cycle.id or 0, target, reason="because")


def test_at_most_one_active_cycle_per_project_is_enforced_by_the_database(
    engine: sa.Engine,
) -> None:
    with db.session_scope(engine) as session:
        project_id = make_project(session).id or 0
        first = create_cycle(session, project_id=project_id, trigger="cli")
    assert first.number == 1
    # A plain insert that skips create_cycle's error handling still cannot get past the index,
    # nor reuse a cycle number.
    with pytest.raises(sa.exc.IntegrityError):
        insert_row(engine, Cycle(project_id=project_id, number=2, trigger="race"))
    with pytest.raises(sa.exc.IntegrityError):
        insert_row(engine, Cycle(project_id=project_id, number=1, trigger="copy", state="done"))
    with db.session_scope(engine) as session, pytest.raises(Conflict) as refused:
        create_cycle(session, project_id=project_id, trigger="beat")
    # The project by its name, the blocking cycle by id and state: what to cancel, and where.
    name = refused.value.args[0].split("'")[1]
    assert str(refused.value) == (
        f"project '{name}' already has an active cycle (id {first.id}, pending); "
        "wait for it or cancel it"
    )
    with db.session_scope(engine) as session:
        assert session.get(Project, project_id).name == name  # type: ignore[union-attr]
    with db.session_scope(engine) as session:
        with pytest.raises(InvalidInput, match="needs a reason"):
            transition_cycle(session, first.id or 0, CycleState.FAILED)
        transition_cycle(session, first.id or 0, CycleState.FAILED, reason="worker lost")
        second = create_cycle(session, project_id=project_id, trigger="beat")
        assert second.id != first.id and second.number == 2


def test_upgrading_a_database_with_rows_keeps_them_and_fills_new_columns(
    engine: sa.Engine,
) -> None:
    """Each revision applied on top of data: new NOT NULL columns get their defaults."""
    if engine.dialect.name == "postgresql":
        # The session database is at head already; migrate a fresh schema of our own instead.
        schema = unique_name("mig").replace("-", "_")
        with engine.begin() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
        url = engine.url.set(query={"options": f"-csearch_path={schema}"})
        target = db.make_engine(url.render_as_string(hide_password=False))
    else:
        target = db.make_engine(str(engine.url).replace("state.db", "old.db"))
    db.upgrade(target, "0001")
    with target.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO project (name, labels, modality, store_url, loss_config, "
                "selection_config, batch_size, retrain_min_new_labels, paused, created_at, "
                "updated_at) VALUES ('old-project', '[\"a\", \"b\"]', 'features', 'file:///t', "
                "'{}', '{}', 5, 10, false, :now, :now)"
            ),
            {"now": T0},
        )
    db.upgrade(target, "0004")
    with target.begin() as connection:
        project_id = connection.execute(sa.text("SELECT id FROM project")).scalar_one()
        for state in ("done", "failed", "pending"):
            connection.execute(
                sa.text(
                    "INSERT INTO cycle (project_id, state, trigger, cancel_requested, "
                    "train_attempts, timeline, chunks_done, created_at, updated_at) VALUES "
                    "(:project, :state, 'old', false, 0, '[]', 0, :now, :now)"
                ),
                {"project": project_id, "state": state, "now": T0},
            )
    db.upgrade(target)
    with db.session_scope(target) as session:
        project = get_project(session, "old-project")
        assert project.labeler == {"kind": "none"}
        assert project.labels == ["a", "b"]
        assert project.seed == 0
        numbers = session.exec(
            select(Cycle.number).where(Cycle.project_id == project.id).order_by(col(Cycle.id))
        ).all()
        assert numbers == [1, 2, 3]
    target.dispose()
