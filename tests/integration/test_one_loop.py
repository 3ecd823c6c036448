"""One loop: the cycle a simulation runs is the cycle a Celery worker runs. The same project and
seed, run in-process by the simulation's runner and by a real worker over a private Redis, make
the same selections and models equal to 1e-6."""

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from services import db
from services.config import Settings, child_environment
from services.cycle.ingest import pending_events
from services.cycle.runner import run_cycle
from services.cycle.trigger import maybe_start_cycle
from services.models import Cycle, CycleSelection, Item, ModelVersion
from services.simulation.deployment import Deployment, ProjectSettings, deploy
from tests.conftest import Digits
from tests.integration.conftest import PrivateRedis
from tests.integration.test_workers import Cluster, sender, wait_for

N_ITEMS = 450
CYCLES = 2


def deployment(folder: Path, base: Settings, digits: Digits, *, seed: int) -> Deployment:
    """Digits 8 vs the rest as features, 20 seed labels, batches of 20, an evaluation set:
    every stage of the product takes part (3 score chunks of 150 items)."""
    labels = (digits.labels[:N_ITEMS] == 8).astype(np.int64)
    rng = np.random.default_rng(seed)
    seeded = np.sort(rng.choice(N_ITEMS, size=20, replace=False)).astype(np.int64)
    folder.mkdir(parents=True)
    return deploy(
        folder,
        base.model_copy(update={"pool_shard_items": 150, "torch_threads": 1}),
        items=digits.features[:N_ITEMS],
        labels=labels,
        n_classes=2,
        seeded=seeded,
        project=ProjectSettings(
            loss={"kind": "focal", "gamma": 2.0, "alpha": "effective_number", "prior_bias": True},
            selection={},
            batch_size=20,
            label_budget=None,
            seed=seed,
            noise=0.0,
        ),
    )


def record(engine: sa.Engine) -> dict[str, Any]:
    """Every cycle's selection (by external id, in rank order) and every model's metrics."""
    with db.session_scope(engine) as session:
        cycles = session.exec(select(Cycle).order_by(col(Cycle.number))).all()
        selections = {
            cycle.number: [
                (
                    external_id,
                    row.rank,
                    row.evaluation,
                    row.cold_start,
                    row.predicted_label,
                    row.score,
                    row.probability,
                )
                for row, external_id in session.execute(
                    select(CycleSelection, Item.external_id)
                    .join(Item, col(Item.id) == col(CycleSelection.item_id))
                    .where(CycleSelection.cycle_id == cycle.id)
                    .order_by(col(CycleSelection.rank))
                ).all()
            ]
            for cycle in cycles
        }
        models = {
            model.version: (model.promotion, model.metrics)
            for model in session.exec(select(ModelVersion)).all()
        }
    return {"states": [c.state for c in cycles], "selections": selections, "models": models}


def assert_close(a: Any, b: Any, path: str = "") -> None:
    """Equal structures; numbers equal to 1e-6 (absolute), everything else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{path}[{index}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None, path
        assert math.isclose(a, b, rel_tol=0, abs_tol=1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


def simulated_run(folder: Path, base: Settings, digits: Digits) -> dict[str, Any]:
    run = deployment(folder, base, digits, seed=7)
    for _ in range(CYCLES):
        cycle = maybe_start_cycle(run.engine, run.project, run.settings)
        assert cycle is not None
        run_cycle(run.engine, cycle.id or 0, run.settings)
    outcome = record(run.engine)
    run.engine.dispose()
    return outcome


def worker_run(
    folder: Path, base: Settings, digits: Digits, redis_url: str, logs: Path
) -> dict[str, Any]:
    run = deployment(folder, base, digits, seed=7)
    settings = run.settings.model_copy(update={"broker_url": redis_url})
    logs.mkdir()
    cluster = Cluster(env=child_environment(settings), logs=logs)
    try:
        cluster.worker(concurrency=2)
        for _ in range(CYCLES):
            cycle = maybe_start_cycle(run.engine, run.project, settings)
            assert cycle is not None
            sender(settings).send_task("focalloop.train", args=[cycle.id], queue="gpu")
            wait_for(
                functools.partial(_finished, run.engine, cycle.id or 0),
                timeout=180,
                what=f"cycle {cycle.number} done and its answers ingested",
                logs=cluster,
            )
    finally:
        cluster.stop()
    outcome = record(run.engine)
    run.engine.dispose()
    return outcome


def _finished(engine: sa.Engine, cycle_id: int) -> bool:
    with db.session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        assert cycle is not None
        assert cycle.state != "failed", cycle.failure_reason
        return cycle.state == "done" and not pending_events(session)


@pytest.mark.slow
def test_a_simulated_run_and_a_celery_worker_run_are_the_same_loop(
    settings: Settings, private_redis: PrivateRedis, digits: Digits, tmp_path: Path
) -> None:
    simulated = simulated_run(tmp_path / "simulated", settings, digits)
    distributed = worker_run(
        tmp_path / "worker", settings, digits, private_redis.url, tmp_path / "logs"
    )
    assert simulated["states"] == ["done"] * CYCLES
    assert len(simulated["models"]) == CYCLES  # both cycles trained (seed labels)
    assert all(len(rows) == 20 for rows in simulated["selections"].values())
    assert any(row[2] for row in simulated["selections"][1])  # evaluation items took part
    assert_close(simulated, distributed)
