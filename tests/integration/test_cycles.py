"""The distributed cycle's stages, run in-process on SQLite and PostgreSQL: the full loop,
redelivery, cancel, pause, budget, cron, recovery, failing chunks, and concurrent starts."""

import multiprocessing
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlmodel import col, func, select

from services import db
from services.config import Settings
from services.cycle import recover, start, train, trigger
from services.cycle.flow import Stage, Step
from services.cycle.ingest import ingest_events
from services.cycle.leases import claim_chunk
from services.datasets.pool import add_to_pool
from services.datasets.snapshot import get_version, model_lineage
from services.errors import Conflict, InvalidInput, NonFiniteLossError, TransientError
from services.models import (
    Annotation,
    Cycle,
    CycleState,
    Item,
    ModelVersion,
    ScoreChunk,
    utcnow,
)
from services.projects import get_project, pool_counts, set_paused, update_project
from tests.conftest import Digits
from tests.integration.cycle_helpers import (
    chunk_ids,
    cycle_row,
    make_digits_project,
    run_stages,
    selected_items,
    stage,
)


@pytest.fixture
def cycle_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"pool_shard_items": 200, "lease_s": 30.0})


def begin(engine: sa.Engine, name: str, settings: Settings) -> int:
    cycle = trigger.maybe_start_cycle(engine, name, settings)
    assert cycle is not None
    return cycle.id or 0


def test_cycles_run_and_each_trains_on_the_version_the_last_one_produced(
    engine: sa.Engine, cycle_settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    project = make_digits_project(engine, cycle_settings, digits, tmp_path)
    first = begin(engine, project.name, cycle_settings)
    assert cycle_row(engine, first).trigger == "first cycle"
    run_stages(engine, first, cycle_settings)
    done = cycle_row(engine, first)
    assert (done.state, done.dataset_version, done.model_version) == ("done", None, None)
    assert (done.selected_count, done.cold_start_picks) == (20, 20)
    with db.session_scope(engine) as session:
        counts = pool_counts(session, get_project(session, project.name)).by_status
        assert (counts["labeled"], counts["unlabeled"]) == (20, 580)

    # Nothing new since: beat starts nothing while below the threshold... but 20 labels arrived.
    second = begin(engine, project.name, cycle_settings)
    row = cycle_row(engine, second)
    assert (row.trigger, row.dataset_version) == ("20 new labels", 1)
    run_stages(engine, second, cycle_settings)
    row = cycle_row(engine, second)
    assert (row.state, row.model_version, row.chunks_total, row.chunks_done) == ("done", 1, 3, 3)
    assert row.selected_count == 20
    assert [entry["state"] for entry in row.timeline] == [
        "pending",
        "training",
        "scoring",
        "selecting",
        "handing_off",
        "done",
    ]

    third = begin(engine, project.name, cycle_settings)
    run_stages(engine, third, cycle_settings)
    row = cycle_row(engine, third)
    assert (row.dataset_version, row.model_version) == (2, 2)
    with db.session_scope(engine) as session:
        p = get_project(session, project.name)
        assert model_lineage(session, p, 2) == [2, 1]
        models = session.exec(
            select(ModelVersion.version, ModelVersion.promotion)
            .where(ModelVersion.project_id == p.id)
            .order_by(col(ModelVersion.version))
        ).all()
        assert models == [(1, "retired"), (2, "current")]
        chunks = session.exec(select(ScoreChunk).where(ScoreChunk.cycle_id == third)).all()
        assert {c.attempts for c in chunks} == {1}
        assert sum(c.items_scored or 0 for c in chunks) == 560
    picked = selected_items(engine, project.name)
    assert len(picked) == 60 == len(set(picked))  # no item selected twice
    with db.session_scope(engine) as session:
        answers = session.exec(
            select(Annotation.source, Annotation.annotator).where(Annotation.project_id == p.id)
        ).all()
    # Every answer is the simulated annotator's, and marked as such.
    assert set(answers) == {("simulated", "sim")} and len(answers) == 60


def test_every_stage_is_harmless_when_redelivered(
    engine: sa.Engine, cycle_settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    project = make_digits_project(engine, cycle_settings, digits, tmp_path)
    run_stages(engine, begin(engine, project.name, cycle_settings), cycle_settings)
    cycle_id = begin(engine, project.name, cycle_settings)
    chunks = chunk_ids(stage(engine, cycle_settings, Stage.TRAIN, cycle_id))
    assert stage(engine, cycle_settings, Stage.TRAIN, cycle_id) == []
    for chunk_id in chunks:
        stage(engine, cycle_settings, Stage.SCORE, chunk_id)
        assert stage(engine, cycle_settings, Stage.SCORE, chunk_id) == []
    with db.session_scope(engine) as session:
        redone = session.exec(select(ScoreChunk).where(ScoreChunk.cycle_id == cycle_id)).all()
        assert {chunk.attempts for chunk in redone} == {1}  # the second delivery scored nothing
    assert stage(engine, cycle_settings, Stage.SELECT, cycle_id) == [Step(Stage.HAND_OFF, cycle_id)]
    assert stage(engine, cycle_settings, Stage.SELECT, cycle_id) == []
    (ingest,) = stage(engine, cycle_settings, Stage.HAND_OFF, cycle_id)
    assert stage(engine, cycle_settings, Stage.HAND_OFF, cycle_id) == []
    assert ingest_events(engine, ingest.event_ids).stored == 20
    again = ingest_events(engine, ingest.event_ids)
    assert (again.stored, again.duplicates) == (0, 20)
    with db.session_scope(engine) as session:
        p = get_project(session, project.name)
        stored = session.exec(
            select(func.count()).select_from(Annotation).where(Annotation.project_id == p.id)
        ).one()
        assert stored == 40
        assert cycle_row(engine, cycle_id).model_version == 1
        models = session.exec(
            select(func.count()).select_from(ModelVersion).where(ModelVersion.project_id == p.id)
        ).one()
        assert models == 1


def test_cancel_stops_a_pending_cycle_at_once_and_a_running_one_at_its_next_checkpoint(
    engine: sa.Engine, cycle_settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    project = make_digits_project(engine, cycle_settings, digits, tmp_path)
    first = begin(engine, project.name, cycle_settings)
    with db.session_scope(engine) as session:
        assert start.cancel_cycle(session, project.name).state == "cancelled"
    assert stage(engine, cycle_settings, Stage.TRAIN, first) == []
    with db.session_scope(engine) as session:
        second = start.start_cycle(session, project.name, trigger="test", settings=cycle_settings)
    second_id = second.id or 0
    cold = stage(engine, cycle_settings, Stage.TRAIN, second_id)
    assert cold == [Step(Stage.SELECT, second_id)]  # cold start
    assert stage(engine, cycle_settings, Stage.SELECT, second_id)
    with db.session_scope(engine) as session:
        start.cancel_cycle(session, project.name)
    assert stage(engine, cycle_settings, Stage.HAND_OFF, second_id) == []
    assert cycle_row(engine, second.id or 0).state == "cancelled"
    with db.session_scope(engine) as session:
        # The cancelled cycle's selection went back to the pool.
        counts = pool_counts(session, get_project(session, project.name)).by_status
        assert (counts["selected"], counts["unlabeled"]) == (0, 600)
        with pytest.raises(Exception, match="no active cycle"):
            start.cancel_cycle(session, project.name)


def test_paused_projects_and_spent_budgets_start_nothing(
    engine: sa.Engine, cycle_settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    project = make_digits_project(
        engine, cycle_settings, digits, tmp_path, label_budget=30, retrain_min_new_labels=5
    )
    with db.session_scope(engine) as session:
        set_paused(session, project.name, paused=True)
    assert trigger.maybe_start_cycle(engine, project.name, cycle_settings) is None
    with db.session_scope(engine) as session, pytest.raises(InvalidInput, match="paused"):
        start.start_cycle(session, project.name, trigger="cli", settings=cycle_settings)
    with db.session_scope(engine) as session:
        set_paused(session, project.name, paused=False)
    first = begin(engine, project.name, cycle_settings)
    run_stages(engine, first, cycle_settings)
    second = begin(engine, project.name, cycle_settings)
    run_stages(engine, second, cycle_settings)
    assert cycle_row(engine, second).selected_count == 10  # the 30-label budget caps the batch
    # The budget is spent: one last cycle trains on the last labels and asks for nothing.
    last = begin(engine, project.name, cycle_settings)
    assert cycle_row(engine, last).trigger == "budget spent: training on the last 10 labels"
    run_stages(engine, last, cycle_settings)
    final = cycle_row(engine, last)
    assert (final.state, final.dataset_version, final.model_version) == ("done", 2, 2)
    assert (final.selected_count, final.chunks_total) == (0, 0)
    with db.session_scope(engine) as session:
        assert get_version(session, get_project(session, project.name), 2).row_count == 30
    assert trigger.maybe_start_cycle(engine, project.name, cycle_settings) is None
    with db.session_scope(engine) as session, pytest.raises(InvalidInput, match="budget"):
        start.start_cycle(session, project.name, trigger="cli", settings=cycle_settings)


def test_cron_starts_a_cycle_without_new_labels(
    engine: sa.Engine, cycle_settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    project = make_digits_project(engine, cycle_settings, digits, tmp_path)
    first = begin(engine, project.name, cycle_settings)
    run_stages(engine, first, cycle_settings)
    second = begin(engine, project.name, cycle_settings)
    run_stages(engine, second, cycle_settings)
    with db.session_scope(engine) as session:
        update_project(session, project.name, retrain_min_new_labels=1000)
    created = cycle_row(engine, second).created_at
    assert trigger.maybe_start_cycle(engine, project.name, cycle_settings, now=created) is None
    with db.session_scope(engine) as session:
        update_project(session, project.name, retrain_cron="*/5 * * * *")
    later = created + timedelta(minutes=6)
    assert trigger.maybe_start_cycle(engine, project.name, cycle_settings, now=created) is None
    cycle = trigger.maybe_start_cycle(engine, project.name, cycle_settings, now=later)
    assert cycle is not None
    assert cycle.trigger == "cron */5 * * * *"


def test_a_queue_people_answer_is_refilled_under_its_watermark(
    engine: sa.Engine, cycle_settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    project = make_digits_project(engine, cycle_settings, digits, tmp_path)
    run_stages(engine, begin(engine, project.name, cycle_settings), cycle_settings)
    second = begin(engine, project.name, cycle_settings)
    run_stages(engine, second, cycle_settings)
    with db.session_scope(engine) as session:
        row = update_project(session, project.name, retrain_min_new_labels=1000)
        assert row.refill_below == 20  # one batch by default
    # The simulated labeler answers within the hand-off: it has no queue to refill.
    assert trigger.maybe_start_cycle(engine, project.name, cycle_settings) is None
    with db.session_scope(engine) as session:
        unlabeled = session.exec(
            select(Item.id)
            .where(Item.project_id == get_project(session, project.name).id)
            .where(Item.status == "unlabeled")
            .limit(25)
        ).all()

    def labeler(kind: str) -> None:
        with db.session_scope(engine) as session:
            row = get_project(session, project.name)
            row.labeler = {"kind": kind}
            session.add(row)

    labeler("label_studio")  # people answer later, from a queue

    def queue(count: int) -> None:
        with db.session_scope(engine) as session:
            session.execute(
                sa.update(Item).where(col(Item.id).in_(unlabeled)).values(status="unlabeled")
            )
            session.execute(
                sa.update(Item).where(col(Item.id).in_(unlabeled[:count])).values(status="queued")
            )

    queue(20)  # a full batch waits: nothing to refill
    assert trigger.maybe_start_cycle(engine, project.name, cycle_settings) is None
    with db.session_scope(engine) as session:
        update_project(session, project.name, refill_below=0)  # off
    queue(19)
    assert trigger.maybe_start_cycle(engine, project.name, cycle_settings) is None
    with db.session_scope(engine) as session:
        update_project(session, project.name, refill_below=20)
    cycle = trigger.maybe_start_cycle(engine, project.name, cycle_settings)
    assert cycle is not None
    assert cycle.trigger == "queue low: 19 open tasks (refill below 20)"
    # Without a label since the newest model, refilling would select the same items again: a
    # cycle trains on every label and hands its batch to nobody ("none" keeps it selected).
    labeler("none")
    run_stages(engine, cycle.id or 0, cycle_settings)
    labeler("label_studio")
    queue(0)
    assert trigger.maybe_start_cycle(engine, project.name, cycle_settings) is None


def test_recovery_reenqueues_expired_leases_and_fails_after_the_attempt_limit(
    engine: sa.Engine, cycle_settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    settings = cycle_settings.model_copy(update={"max_chunk_attempts": 2, "lease_s": 5.0})
    project = make_digits_project(engine, settings, digits, tmp_path)
    run_stages(engine, begin(engine, project.name, settings), settings)
    cycle_id = begin(engine, project.name, settings)
    chunks = chunk_ids(stage(engine, settings, Stage.TRAIN, cycle_id))
    with db.session_scope(engine) as session:
        claimed = claim_chunk(session, chunks[0], "dead-worker", settings)
    assert claimed == 1
    # Recovery looks at every cycle in the database, and on PostgreSQL that database is shared
    # with other tests: judge what it decides for this test's own cycle.

    def ours(ids: list[int]) -> list[int]:
        # Sorted: PostgreSQL returns updated rows in no fixed order.
        return sorted(chunk_id for chunk_id in ids if chunk_id in chunks)

    soon = utcnow() + timedelta(seconds=1)
    assert ours(recover.recover_stalled(engine, settings, now=soon).chunk_ids) == []  # live lease
    later = utcnow() + timedelta(seconds=10)
    expired = recover.recover_stalled(engine, settings, now=later, stale_s=3600)
    assert ours(expired.chunk_ids) == [chunks[0]]
    # Pending chunks untouched for a lease may have lost their message: enqueued again too.
    assert ours(recover.recover_stalled(engine, settings, now=later).chunk_ids) == sorted(chunks)
    with db.session_scope(engine) as session:
        session.execute(
            sa.update(ScoreChunk)
            .where(col(ScoreChunk.id) == chunks[0])
            .values(attempts=2, lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    recovery = recover.recover_stalled(engine, settings)
    assert cycle_id in recovery.failed_cycle_ids
    failed = cycle_row(engine, cycle_id)
    assert failed.state == "failed"
    assert "gave up after 2 attempts" in (failed.failure_reason or "")


def _cycle_with_a_damaged_shard(
    engine: sa.Engine, settings: Settings, digits: Digits, tmp_path: Path
) -> tuple[str, int]:
    """A project past its cold start whose later items landed in a shard of their own, damaged
    behind focalloop's back; returns that shard's key and the started cycle that will score it."""
    project = make_digits_project(engine, settings, digits, tmp_path)
    run_stages(engine, begin(engine, project.name, settings), settings)
    extra = tmp_path / "extra.npz"
    np.savez(extra, features=digits.features[1000:1100] + 0.001)
    with db.session_scope(engine) as session:
        report = add_to_pool(
            session,
            get_project(session, project.name),
            str(extra),
            settings=settings,
            trusted_roots=[f"file://{tmp_path}"],
        )
    (tmp_path / "store" / report.shards[0]).write_bytes(b"PAR1 damaged")
    return report.shards[0], begin(engine, project.name, settings)


def test_a_chunk_that_fails_every_time_fails_the_cycle_after_n_attempts(
    engine: sa.Engine, cycle_settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    settings = cycle_settings.model_copy(update={"max_chunk_attempts": 3})
    damaged, cycle_id = _cycle_with_a_damaged_shard(engine, settings, digits, tmp_path)
    chunks = chunk_ids(stage(engine, settings, Stage.TRAIN, cycle_id))
    with db.session_scope(engine) as session:
        bad_id = session.exec(
            select(ScoreChunk.id).where(
                ScoreChunk.cycle_id == cycle_id, ScoreChunk.shard_key == damaged
            )
        ).one()
    bad = bad_id or 0
    for attempt in (1, 2):
        with pytest.raises(TransientError, match=f"attempt {attempt} failed"):
            stage(engine, settings, Stage.SCORE, bad)
    stage(engine, settings, Stage.SCORE, bad)  # the last attempt gives up
    for chunk_id in chunks:
        stage(engine, settings, Stage.SCORE, chunk_id)  # the others find it failed
    failed = cycle_row(engine, cycle_id)
    assert failed.state == "failed"
    assert "failed 3 times" in (failed.failure_reason or "")
    assert "content does not match its hash" in (failed.failure_reason or "")
    with db.session_scope(engine) as session:
        chunk = session.get(ScoreChunk, bad)
        assert chunk is not None and (chunk.state, chunk.attempts) == ("failed", 3)
    assert stage(engine, settings, Stage.SELECT, cycle_id) == []


def test_the_in_process_runner_retries_a_failing_chunk_as_celery_would(
    engine: sa.Engine, cycle_settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    settings = cycle_settings.model_copy(update={"max_chunk_attempts": 3})
    _, cycle_id = _cycle_with_a_damaged_shard(engine, settings, digits, tmp_path)
    run_stages(engine, cycle_id, settings)  # retried in the drain, never raised out of it
    failed = cycle_row(engine, cycle_id)
    assert failed.state == "failed"
    assert "failed 3 times" in (failed.failure_reason or "")
    with db.session_scope(engine) as session:
        states = sorted(
            chunk.state
            for chunk in session.exec(select(ScoreChunk).where(ScoreChunk.cycle_id == cycle_id))
        )
    assert states.count("failed") == 1 and states.count("done") == len(states) - 1


def _start_together(
    url: str,
    name: str,
    barrier: "multiprocessing.synchronize.Barrier",
    results: "multiprocessing.Queue[str]",
    data_dir: str,
) -> None:
    engine = db.make_engine(url)
    settings = Settings(data_dir=Path(data_dir))
    barrier.wait()
    try:
        with db.session_scope(engine) as session:
            start.start_cycle(session, name, trigger="race", settings=settings)
        results.put("started")
    except Conflict:
        results.put("conflict")


@pytest.mark.parametrize("contenders", [2, 4])
def test_concurrent_starts_from_separate_processes_make_exactly_one_cycle(
    engine: sa.Engine, cycle_settings: Settings, digits: Digits, tmp_path: Path, contenders: int
) -> None:
    project = make_digits_project(engine, cycle_settings, digits, tmp_path, n_items=50)
    url = engine.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(contenders)
    results: multiprocessing.Queue[str] = context.Queue()
    processes = [
        context.Process(
            target=_start_together,
            args=(url, project.name, barrier, results, str(tmp_path / "data")),
        )
        for _ in range(contenders)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    outcomes = sorted(results.get(timeout=5) for _ in range(contenders))
    assert outcomes == ["conflict"] * (contenders - 1) + ["started"]
    with db.session_scope(engine) as session:
        p = get_project(session, project.name)
        count = session.exec(
            select(func.count()).select_from(Cycle).where(Cycle.project_id == p.id)
        ).one()
        assert count == 1
        state = session.exec(select(Cycle.state).where(Cycle.project_id == p.id)).one()
        assert state == CycleState.PENDING


@pytest.fixture(params=["sqlite", "postgresql"])
def own_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """A database for one test alone (start_due_cycles acts on every project it holds)."""
    url = (
        f"sqlite:///{tmp_path / 'own.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("own_pg_database_url")
    )
    engine = db.make_engine(url)
    db.upgrade(engine)
    yield engine
    engine.dispose()


def test_one_broken_project_does_not_stop_the_others_from_starting(
    own_engine: sa.Engine, cycle_settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    engine = own_engine
    healthy = make_digits_project(engine, cycle_settings, digits, tmp_path / "healthy")
    broken = make_digits_project(engine, cycle_settings, digits, tmp_path / "broken")
    # Seed labels make its first cycle snapshot, which needs its store: replace the store
    # folder by a file, so writing there fails.
    with db.session_scope(engine) as session:
        project = get_project(session, broken.name)
        session.execute(
            sa.update(Item)
            .where(col(Item.project_id) == project.id, col(Item.external_id).in_(["d0000"]))
            .values(label="other", status="labeled")
        )
    store = tmp_path / "broken" / "store"
    shutil.rmtree(store)
    store.write_text("not a folder")
    started = trigger.start_due_cycles(engine, cycle_settings)
    names = {cycle_row(engine, cycle.id or 0).project_id for cycle in started}
    with db.session_scope(engine) as session:
        assert get_project(session, healthy.name).id in names
        assert get_project(session, broken.name).id not in names
        assert start.active_cycle(session, get_project(session, broken.name)) is None


def test_a_permanent_training_error_fails_the_cycle_at_once_with_its_reason(
    engine: sa.Engine,
    cycle_settings: Settings,
    digits: Digits,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = make_digits_project(engine, cycle_settings, digits, tmp_path)
    run_stages(engine, begin(engine, project.name, cycle_settings), cycle_settings)
    cycle_id = begin(engine, project.name, cycle_settings)

    def diverge(**_: object) -> None:
        raise NonFiniteLossError(epoch=3, step=7, value=float("nan"))

    monkeypatch.setattr(train, "fit", diverge)
    assert stage(engine, cycle_settings, Stage.TRAIN, cycle_id) == []
    failed = cycle_row(engine, cycle_id)
    assert failed.state == "failed"
    assert "training failed: training loss became non-finite" in (failed.failure_reason or "")
    assert failed.train_attempts == 1
