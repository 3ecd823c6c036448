"""Real Celery workers on a private redis-server: the loop end to end, and the faults it must
survive (a killed pool child, a killed worker, a Redis restart, a chunk that always fails).

Every test starts its own redis-server on a free port and its own worker (and beat) processes,
with short leases and visibility timeout so recovery happens in seconds. The machine's own Redis
is never touched: the test process sends tasks through an app built for the private broker.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from celery import Celery
from sqlmodel import col, select

from services import db
from services.config import Settings, child_environment
from services.cycle.start import active_cycle, cancel_cycle, start_cycle
from services.cycle.trigger import maybe_start_cycle
from services.datasets.pool import add_to_pool
from services.models import Cycle, ScoreChunk
from services.projects import get_project, pool_counts, set_paused
from tests.conftest import Digits
from tests.integration.conftest import PrivateRedis
from tests.integration.cycle_helpers import (
    DigitsProject,
    cycle_row,
    make_digits_project,
    run_stages,
    selected_items,
)
from workers.app import create_app

FOCALLOOP = str(Path(sys.executable).with_name("focalloop"))


@dataclass
class Cluster:
    """Worker and beat processes sharing this test's database, store and broker."""

    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [FOCALLOOP, *args],
            env=self.env,
            stdout=(self.logs / f"{name}.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killpg takes the pool children too
        )
        self.processes.append(process)
        return process

    def worker(self, name: str = "worker", concurrency: int = 2) -> subprocess.Popen[bytes]:
        return self.spawn(
            "worker",
            "--queues",
            "gpu,io",
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{name}@%h",
            name=name,
        )

    def beat(self) -> subprocess.Popen[bytes]:
        return self.spawn("beat", "--schedule", str(self.logs / "beat-schedule"), name="beat")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def worker_settings(settings: Settings, private_redis: PrivateRedis, database_url: str) -> Settings:
    return settings.model_copy(
        update={
            "database_url": database_url,
            "broker_url": private_redis.url,
            "lease_s": 3.0,
            "visibility_timeout_s": 10,
            "pool_shard_items": 200,
            "recover_interval_s": 1.0,
            "schedule_interval_s": 1.0,
            "torch_threads": 1,
        }
    )


@pytest.fixture
def state(worker_settings: Settings) -> Iterator[sa.Engine]:
    engine = db.make_engine(worker_settings.resolved_database_url())
    db.upgrade(engine)
    yield engine
    engine.dispose()


def cluster_for(settings: Settings, logs: Path, **extra: str) -> Cluster:
    logs.mkdir(parents=True, exist_ok=True)
    return Cluster(env=child_environment(settings, **extra), logs=logs)


@pytest.fixture
def cluster(worker_settings: Settings, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**extra: str) -> Cluster:
        made.append(cluster_for(worker_settings, tmp_path / "logs", **extra))
        return made[-1]

    yield make
    for each in made:
        each.stop()


def sender(settings: Settings) -> Celery:
    """An app bound to the private broker, for sending tasks from the test process."""
    return create_app(settings)


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str, logs: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n--- worker log ---\n{logs.log('worker')}")


def state_of(engine: sa.Engine, cycle_id: int) -> str:
    return cycle_row(engine, cycle_id).state


def prepare_scoring_cycle(
    engine: sa.Engine, settings: Settings, digits: Digits, folder: Path
) -> tuple[DigitsProject, int]:
    """A project whose cold-start cycle already ran in-process, and its next cycle, pending on
    the dataset version those labels became (so it trains and scores 3 chunks)."""
    project = make_digits_project(engine, settings, digits, folder)
    first = maybe_start_cycle(engine, project.name, settings)
    assert first is not None
    run_stages(engine, first.id or 0, settings)
    second = maybe_start_cycle(engine, project.name, settings)
    assert second is not None and second.dataset_version == 1
    return project, second.id or 0


def train_until_a_chunk_is_mid_task(
    engine: sa.Engine, settings: Settings, running: Cluster, cycle_id: int
) -> ScoreChunk:
    """Enqueue the cycle's training and wait until a chunk is being scored (the workers run
    with a completion delay, so the chunk stays mid-task long enough for a fault to land)."""
    sender(settings).send_task("focalloop.train", args=[cycle_id], queue="gpu")
    wait_for(
        lambda: running_chunk(engine, cycle_id) is not None,
        timeout=90,
        what="a chunk mid-task",
        logs=running,
    )
    chunk = running_chunk(engine, cycle_id)
    assert chunk is not None
    return chunk


def running_chunk(engine: sa.Engine, cycle_id: int) -> ScoreChunk | None:
    with db.session_scope(engine) as session:
        return session.exec(
            select(ScoreChunk).where(ScoreChunk.cycle_id == cycle_id, ScoreChunk.state == "running")
        ).first()


def chunks_of(engine: sa.Engine, cycle_id: int) -> list[ScoreChunk]:
    with db.session_scope(engine) as session:
        return list(
            session.exec(
                select(ScoreChunk)
                .where(ScoreChunk.cycle_id == cycle_id)
                .order_by(col(ScoreChunk.index))
            ).all()
        )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_worker_and_beat_run_the_loop_end_to_end(
    backend: str,
    request: pytest.FixtureRequest,
    worker_settings: Settings,
    cluster: Callable[..., Cluster],
    digits: Digits,
    tmp_path: Path,
) -> None:
    if backend == "postgresql":
        worker_settings = worker_settings.model_copy(
            # Its own database: beat acts on every project it finds, never other tests' ones.
            update={"database_url": request.getfixturevalue("own_pg_database_url")}
        )
    engine = db.make_engine(worker_settings.resolved_database_url())
    db.upgrade(engine)
    project = make_digits_project(engine, worker_settings, digits, tmp_path / "project")
    running = cluster_for(worker_settings, tmp_path / "logs")
    try:
        running.worker()
        running.beat()

        def cycles_done() -> list[Cycle]:
            with db.session_scope(engine) as session:
                p = get_project(session, project.name)
                return list(
                    session.exec(
                        select(Cycle)
                        .where(Cycle.project_id == p.id, Cycle.state == "done")
                        .order_by(col(Cycle.id))
                    ).all()
                )

        wait_for(lambda: len(cycles_done()) >= 3, timeout=180, what="3 cycles", logs=running)
        first, second, third = cycles_done()[:3]
        assert (first.dataset_version, first.model_version) == (None, None)
        assert (second.dataset_version, second.model_version) == (1, 1)
        assert (third.dataset_version, third.model_version) == (2, 2)
        assert second.chunks_done == second.chunks_total == 3
        with db.session_scope(engine) as session:
            set_paused(session, project.name, paused=True)

        def settled() -> bool:
            with db.session_scope(engine) as session:
                p = get_project(session, project.name)
                counts = pool_counts(session, p).by_status
                return active_cycle(session, p) is None and (
                    counts["queued"] + counts["selected"] == 0
                )

        # Paused: the running cycle finishes, its answers are ingested, nothing new starts.
        wait_for(settled, timeout=120, what="the paused project to settle", logs=running)
    finally:
        running.stop()
    # The worker's logs are JSON lines carrying the project, cycle and task they came from.
    lines = [
        json.loads(line) for line in running.log("worker").splitlines() if line.startswith("{")
    ]
    moved = [line for line in lines if line["message"] == f"cycle {second.id}: training -> scoring"]
    assert len(moved) == 1
    assert moved[0]["project"] == project.name
    assert (moved[0]["cycle_id"], moved[0]["task"]) == (second.id, "focalloop.train")
    assert len(moved[0]["task_id"]) == 36  # Celery's uuid
    picked = selected_items(engine, project.name)
    assert len(picked) == len(set(picked))  # no item selected twice
    with db.session_scope(engine) as session:
        counts = pool_counts(session, get_project(session, project.name)).by_status
        # Every answer the simulated annotator gave was ingested.
        assert counts["labeled"] == len(picked) >= 60
    engine.dispose()


def test_cycle_start_from_the_command_line(
    state: sa.Engine,
    worker_settings: Settings,
    cluster: Callable[..., Cluster],
    digits: Digits,
    tmp_path: Path,
) -> None:
    project = make_digits_project(state, worker_settings, digits, tmp_path / "project")
    # Two GPUs as CUDA_VISIBLE_DEVICES names them (none exists here: "auto" falls back to the
    # CPU for the work itself): each pool process pins one of them before it imports CUDA.
    running = cluster(CUDA_VISIBLE_DEVICES="GPU-a,GPU-b")
    running.worker()
    result = subprocess.run(
        [FOCALLOOP, "cycle", "start", project.name],
        env=running.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "started cycle" in result.stdout
    cycle_id = int(result.stdout.split("started cycle ")[1].split()[0])
    wait_for(lambda: state_of(state, cycle_id) == "done", timeout=120, what="done", logs=running)
    again = subprocess.run(
        [FOCALLOOP, "cycle", "status", project.name, "--json"],
        env=running.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert '"state": "done"' in again.stdout
    pinned = _pinned(running)
    assert pinned == {"pool process 0 pinned to GPU GPU-a", "pool process 1 pinned to GPU GPU-b"}


def _pinned(running: Cluster) -> set[str]:
    """The worker log's pinning lines (JSON lines; anything else in the log is skipped)."""
    found = set()
    for line in running.log("worker").splitlines():
        if line.startswith("{") and "pinned to GPU" in line:
            found.add(json.loads(line)["message"])
    return found


def test_a_worker_told_to_use_cuda_on_a_host_without_one_refuses_to_start(
    state: sa.Engine,  # a migrated database: a worker refuses an unmigrated one first
    worker_settings: Settings,
    tmp_path: Path,
) -> None:
    env = child_environment(
        worker_settings.model_copy(update={"device": "cuda"}), CUDA_VISIBLE_DEVICES=""
    )
    result = subprocess.run(
        [FOCALLOOP, "worker", "--queues", "gpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "FOCALLOOP_DEVICE=cuda but this host shows no GPU" in result.stderr


def test_killed_pool_child_mid_chunk_is_redone(
    state: sa.Engine,
    worker_settings: Settings,
    cluster: Callable[..., Cluster],
    digits: Digits,
    tmp_path: Path,
) -> None:
    project, cycle_id = prepare_scoring_cycle(state, worker_settings, digits, tmp_path / "p")
    running = cluster(FOCALLOOP_DEBUG_CHUNK_DELAY_S="2")
    running.worker()
    running.beat()
    victim = train_until_a_chunk_is_mid_task(state, worker_settings, running, cycle_id)
    assert victim is not None and victim.attempts == 1 and victim.worker
    child_pid = int(victim.worker.rsplit(":", 1)[1])
    os.kill(child_pid, signal.SIGKILL)
    wait_for(lambda: state_of(state, cycle_id) == "done", timeout=120, what="done", logs=running)
    redone = next(c for c in chunks_of(state, cycle_id) if c.id == victim.id)
    assert (redone.state, redone.attempts) == ("done", 2)
    assert "WorkerLostError" in running.log("worker") or "SIGKILL" in running.log("worker")
    picked = selected_items(state, project.name)
    assert len(picked) == len(set(picked)) == 40


def test_killed_worker_mid_chunk_is_recovered_by_a_new_worker(
    state: sa.Engine,
    worker_settings: Settings,
    cluster: Callable[..., Cluster],
    digits: Digits,
    tmp_path: Path,
) -> None:
    project, cycle_id = prepare_scoring_cycle(state, worker_settings, digits, tmp_path / "p")
    running = cluster(FOCALLOOP_DEBUG_CHUNK_DELAY_S="2")
    first = running.worker(name="first")
    running.beat()
    victim = train_until_a_chunk_is_mid_task(state, worker_settings, running, cycle_id)
    assert victim is not None and victim.attempts == 1
    os.killpg(first.pid, signal.SIGKILL)  # the main process and its pool: a lost machine
    first.wait(timeout=10)
    assert state_of(state, cycle_id) == "scoring"
    running.worker(name="second")
    wait_for(lambda: state_of(state, cycle_id) == "done", timeout=120, what="done", logs=running)
    redone = next(c for c in chunks_of(state, cycle_id) if c.id == victim.id)
    assert redone.state == "done" and redone.attempts >= 2
    assert redone.worker is not None and redone.worker != victim.worker
    picked = selected_items(state, project.name)
    assert len(picked) == len(set(picked)) == 40


def test_redis_restart_mid_cycle(
    state: sa.Engine,
    worker_settings: Settings,
    private_redis: PrivateRedis,
    cluster: Callable[..., Cluster],
    digits: Digits,
    tmp_path: Path,
) -> None:
    project, cycle_id = prepare_scoring_cycle(state, worker_settings, digits, tmp_path / "p")
    running = cluster(FOCALLOOP_DEBUG_CHUNK_DELAY_S="2")
    running.worker()
    running.beat()
    train_until_a_chunk_is_mid_task(state, worker_settings, running, cycle_id)
    private_redis.kill()
    assert state_of(state, cycle_id) == "scoring"  # the broker died mid-cycle
    time.sleep(2)
    private_redis.start()
    wait_for(lambda: state_of(state, cycle_id) == "done", timeout=150, what="done", logs=running)
    picked = selected_items(state, project.name)
    assert len(picked) == len(set(picked)) == 40


def test_a_chunk_failing_every_time_fails_the_cycle_and_stops(
    state: sa.Engine,
    worker_settings: Settings,
    cluster: Callable[..., Cluster],
    digits: Digits,
    tmp_path: Path,
) -> None:
    settings = worker_settings.model_copy(update={"max_chunk_attempts": 3})
    project, _ = prepare_scoring_cycle(state, settings, digits, tmp_path / "p")
    with db.session_scope(state) as session:
        cancel_cycle(session, project.name)
        extra = tmp_path / "extra.npz"
        np.savez(extra, features=digits.features[1000:1100] + 0.001)
        report = add_to_pool(
            session,
            get_project(session, project.name),
            str(extra),
            settings=settings,
            trusted_roots=[f"file://{tmp_path}"],
        )
    (tmp_path / "p" / "store" / report.shards[0]).write_bytes(b"PAR1 damaged")
    with db.session_scope(state) as session:
        cycle_id = start_cycle(session, project.name, trigger="test", settings=settings).id
    assert cycle_id is not None
    running = cluster(FOCALLOOP_MAX_CHUNK_ATTEMPTS="3")
    running.worker()
    running.beat()
    sender(settings).send_task("focalloop.train", args=[cycle_id], queue="gpu")
    wait_for(lambda: state_of(state, cycle_id) == "failed", timeout=120, what="fail", logs=running)
    reason = cycle_row(state, cycle_id).failure_reason or ""
    assert "failed 3 times" in reason and "content does not match its hash" in reason
    bad = next(c for c in chunks_of(state, cycle_id) if c.shard_key == report.shards[0])
    assert (bad.state, bad.attempts) == ("failed", 3)
    time.sleep(4)  # several recovery rounds later, nothing retries it again
    again = next(c for c in chunks_of(state, cycle_id) if c.id == bad.id)
    assert (again.state, again.attempts) == ("failed", 3)
