"""`focalloop bench score`: scoring throughput from the bare forward pass to the distributed path.

Pool: 200,000 x 128 float32 features registered in a project (columnar shards in a local store,
a SQLite database); model: MLP 128 -> 256 -> 256 -> 10 (random weights: speed does not depend
on them). Per chunk size (= pool shard size), median items/s of:
    roofline      `score()` over the whole pool already in memory, in this process
    in-process    the score stage (`services.cycle.score`) over every chunk, one after another,
                  in this process (shard read and hash check, scoring, per-item scores and
                  candidates written to the store, the chunk's database completion)
    distributed   the same chunks as Celery tasks on a private redis-server, run by one
                  `focalloop worker` with 2 pool processes of one torch thread each; timed from
                  the first enqueue until the database shows every chunk done
The in-process and roofline sides use `threads` torch threads (default 2, the CPUs the
distributed side's two processes use). chunk_overhead_ms = (distributed - in-process) wall time
x workers / chunks: the worker time each chunk costs beyond the in-process pipeline.
"""

import os
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
import torch
from celery import Celery
from numpy.typing import NDArray
from sqlmodel import col, select

from services import db
from services.artifacts import load_model
from services.config import Settings, child_environment
from services.cycle.flow import Stage, Step, task_name
from services.cycle.score import score_stage
from services.datasets.pool import add_to_pool
from services.datasets.store import open_store
from services.errors import InvalidInput
from services.ml.checkpoint import SIDECAR_FILE, WEIGHTS_FILE
from services.ml.checkpoint import save_checkpoint as save_checkpoint_dir
from services.ml.nets import ModelSpec, build_model
from services.ml.score import score
from services.ml.train import LossSpec, torch_threads
from services.models import (
    ChunkState,
    Cycle,
    CycleState,
    Item,
    ItemStatus,
    ModelVersion,
    Project,
    Promotion,
    ScoreChunk,
)
from services.projects import ProjectSpec, create_project
from services.servers import FOCALLOOP, RedisServer, free_port
from services.state import create_cycle, transition_cycle

LABELS = [f"class-{i}" for i in range(10)]


@dataclass(frozen=True)
class ScoreBenchRow:
    chunk_size: int
    chunks: int
    items: int
    roofline_items_per_s: float
    inprocess_items_per_s: float
    distributed_items_per_s: float
    inprocess_vs_roofline: float
    distributed_vs_inprocess_ratio: float
    chunk_overhead_ms: float
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _register(
    engine: sa.Engine,
    settings: Settings,
    folder: Path,
    features: NDArray[np.float32],
    chunk_size: int,
) -> str:
    name = f"bench-score-{chunk_size}"
    np.savez(folder / f"pool-{chunk_size}.npz", features=features)
    with db.session_scope(engine) as session:
        project = create_project(
            session,
            ProjectSpec(
                name=name,
                labels=LABELS,
                modality="features",
                store_url=f"file://{folder / 'store'}",
                batch_size=100,
                # No exploration: the bench times scoring, not cold start's clustering.
                selection={"explore_share": 0.0},
            ),
        )
        add_to_pool(
            session,
            project,
            str(folder / f"pool-{chunk_size}.npz"),
            settings=settings.model_copy(update={"pool_shard_items": chunk_size}),
            trusted_roots=[f"file://{folder}"],
        )
    return name


def _install_model(engine: sa.Engine, settings: Settings, name: str, spec: ModelSpec) -> None:
    """A current model version for the project (random weights, written like a trained one)."""
    torch.manual_seed(0)
    model = build_model(spec).eval()
    with db.session_scope(engine) as session:
        project = session.exec(select(Project).where(Project.name == name)).one()
        store = open_store(project.store_url, settings)
        prefix = f"{name}/models/bench"
        with tempfile.TemporaryDirectory() as scratch:
            save_checkpoint_dir(
                Path(scratch),
                model=model,
                spec=spec,
                labels=LABELS,
                loss=LossSpec(),
                temperature=1.0,
            )
            for file in (WEIGHTS_FILE, SIDECAR_FILE):
                store.put_if_absent(f"{prefix}/{file}", (Path(scratch) / file).read_bytes())
        session.add(
            ModelVersion(
                project_id=project.id or 0,
                version=1,
                dataset_version=0,
                artifact_uri=prefix,
                parameters={"spec": spec.to_dict()},
                metrics={},
                promotion=Promotion.CURRENT,
            )
        )


def _scoring_cycle(engine: sa.Engine, name: str) -> list[int]:
    """A fresh cycle in the scoring state with one chunk per shard; returns the chunk ids."""
    with db.session_scope(engine) as session:
        project = session.exec(select(Project).where(Project.name == name)).one()
        # Items a previous round selected go back to the pool, so every round scores them all.
        session.execute(
            sa.update(Item)
            .where(col(Item.project_id) == project.id, col(Item.status) != ItemStatus.UNLABELED)
            .values(status=ItemStatus.UNLABELED)
        )
        for active in session.exec(
            select(Cycle).where(
                Cycle.project_id == project.id,
                col(Cycle.state).not_in(["done", "failed", "cancelled"]),
            )
        ).all():
            transition_cycle(session, active.id or 0, CycleState.FAILED, reason="bench round")
        cycle = create_cycle(session, project_id=project.id or 0, trigger="bench")
        transition_cycle(session, cycle.id or 0, CycleState.TRAINING)
        shards = sorted(
            key
            for (key,) in session.execute(
                sa.select(col(Item.shard_key)).where(col(Item.project_id) == project.id).distinct()
            )
        )
        chunks = [
            ScoreChunk(cycle_id=cycle.id or 0, index=i, shard_key=k) for i, k in enumerate(shards)
        ]
        session.add_all(chunks)
        cycle.model_version = 1
        cycle.chunks_total = len(chunks)
        session.add(cycle)
        session.flush()
        transition_cycle(session, cycle.id or 0, CycleState.SCORING)
        return [chunk.id or 0 for chunk in chunks]


def _all_done(engine: sa.Engine, chunk_ids: list[int]) -> bool:
    with db.session_scope(engine) as session:
        done = session.exec(
            select(sa.func.count())
            .select_from(ScoreChunk)
            .where(col(ScoreChunk.id).in_(chunk_ids), ScoreChunk.state == ChunkState.DONE)
        ).one()
        return int(done) == len(chunk_ids)


def run_score_bench(
    *,
    items: int = 200_000,
    dim: int = 128,
    chunk_sizes: list[int] | None = None,
    repeats: int = 3,
    threads: int = 2,
    workers: int = 2,
) -> list[ScoreBenchRow]:
    sizes = chunk_sizes or [2048, 8192, 32768]
    if min(sizes) < 1:
        raise InvalidInput("chunk sizes must be >= 1")
    rng = np.random.default_rng(0)
    features = rng.standard_normal((items, dim), dtype=np.float32)
    spec = ModelSpec(kind="mlp", input_shape=(dim,), n_classes=len(LABELS), hidden=(256, 256))
    rows: list[ScoreBenchRow] = []
    with tempfile.TemporaryDirectory(prefix="focalloop-bench-score-") as scratch:
        folder = Path(scratch)
        redis_port = free_port()
        settings = Settings(
            data_dir=folder / "data",
            database_url=f"sqlite:///{folder / 'state.db'}",
            broker_url=f"redis://127.0.0.1:{redis_port}/0",
            device="cpu",
            lease_s=600.0,
        )
        engine = db.engine_from_settings(settings)
        db.upgrade(engine)
        names = {size: _register(engine, settings, folder, features, size) for size in sizes}
        for name in names.values():
            _install_model(engine, settings, name, spec)
        redis_server = RedisServer(folder / "redis", port=redis_port, append_only=False)
        env = child_environment(settings.model_copy(update={"torch_threads": 1}))
        worker = None
        try:
            redis_server.start()
            worker = subprocess.Popen(
                [
                    FOCALLOOP,
                    "worker",
                    "--queues",
                    "gpu,io",
                    "--concurrency",
                    str(workers),
                    "--loglevel",
                    "WARNING",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            # A bare client: services never import the workers package; sending by task name
            # is all the benchmark needs.
            sender = Celery("focalloop-bench", broker=settings.broker_url)
            rows.extend(
                _bench_size(
                    engine,
                    settings,
                    sender,
                    names[size],
                    features,
                    spec,
                    size,
                    repeats,
                    threads,
                    workers,
                )
                for size in sizes
            )
        finally:
            if worker is not None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(timeout=60)
            redis_server.kill()
            engine.dispose()
    return rows


def _bench_size(
    engine: sa.Engine,
    settings: Settings,
    sender: Any,
    name: str,
    features: NDArray[np.float32],
    spec: ModelSpec,
    size: int,
    repeats: int,
    threads: int,
    workers: int,
) -> ScoreBenchRow:
    with db.session_scope(engine) as session:
        project = session.exec(select(Project).where(Project.name == name)).one()
        model_row = session.exec(
            select(ModelVersion).where(ModelVersion.project_id == project.id)
        ).one()
        checkpoint = load_model(project, model_row, settings)
    roofline: list[float] = []
    inprocess: list[float] = []
    distributed: list[float] = []
    chunks = 0
    # One warm-up round of the distributed path, so each worker process has loaded the model.
    warm = _scoring_cycle(engine, name)
    for chunk_id in warm:
        sender.send_task(task_name(Stage.SCORE), args=[chunk_id], queue="gpu")
    _wait(engine, warm)
    _wait_final(engine, warm[0])
    for _ in range(repeats):
        with torch_threads(threads):
            start = time.perf_counter()
            score(checkpoint.model, features, spec=spec, device="cpu")
            roofline.append(time.perf_counter() - start)
            chunk_ids = _scoring_cycle(engine, name)
            chunks = len(chunk_ids)
            start = time.perf_counter()
            for chunk_id in chunk_ids:
                score_stage(engine, settings, Step(Stage.SCORE, chunk_id))
            inprocess.append(time.perf_counter() - start)
        chunk_ids = _scoring_cycle(engine, name)
        start = time.perf_counter()
        for chunk_id in chunk_ids:
            sender.send_task(task_name(Stage.SCORE), args=[chunk_id], queue="gpu")
        _wait(engine, chunk_ids)
        distributed.append(time.perf_counter() - start)
        _wait_final(engine, chunk_ids[0])
    n = len(features)
    t_roof, t_in, t_dist = (statistics.median(x) for x in (roofline, inprocess, distributed))
    return ScoreBenchRow(
        chunk_size=size,
        chunks=chunks,
        items=n,
        roofline_items_per_s=n / t_roof,
        inprocess_items_per_s=n / t_in,
        distributed_items_per_s=n / t_dist,
        inprocess_vs_roofline=t_roof / t_in,
        distributed_vs_inprocess_ratio=t_in / t_dist,
        chunk_overhead_ms=(t_dist - t_in) * workers / chunks * 1000,
        repeats=repeats,
    )


def _wait(engine: sa.Engine, chunk_ids: list[int], timeout: float = 600) -> None:
    """Until every chunk is done (the timed part), then until the cycle's selection and
    hand-off, which the last chunk triggered, have finished (so rounds do not overlap)."""
    deadline = time.monotonic() + timeout
    while not _all_done(engine, chunk_ids):
        if time.monotonic() > deadline:
            raise InvalidInput("the distributed chunks did not finish in time")
        time.sleep(0.01)


def _wait_final(engine: sa.Engine, chunk_id: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.session_scope(engine) as session:
            chunk = session.get(ScoreChunk, chunk_id)
            cycle = session.get(Cycle, chunk.cycle_id) if chunk else None
            if cycle is not None and cycle.state in ("done", "failed", "cancelled"):
                return
        time.sleep(0.05)
    raise InvalidInput("the distributed cycle did not finish in time")
