"""`focalloop simulate`: the product's own cycle, run with the simulated labeler, on every arm and
seed, measured on test splits the loop never sees.

An arm is a (strategy, loss) pair, set as project settings. Every arm runs on the same seeds
0..S-1: seed s fixes the test split, the initial labels and the project's seed (from which the
cycle derives every random choice, the annotator's noise included), so arms differ only in their
settings. Each run is an embedded deployment (`deployment.deploy`): beat's trigger starts each
cycle, the in-process runner runs it (train, score, select, hand off, ingest: the same stages a
Celery worker runs), and after each cycle the model that ships is scored on the test split.
Results say `"simulated": true`.
"""

import multiprocessing
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from numpy.typing import NDArray
from sqlmodel import col, select

from services.artifacts import load_model, predict
from services.config import Settings
from services.cycle.flow import Step
from services.cycle.runner import run_cycle
from services.cycle.trigger import maybe_start_cycle
from services.datasets.snapshot import get_version
from services.db import session_scope
from services.errors import PermanentError
from services.ml.metrics import evaluate
from services.ml.train import torch_threads
from services.models import Annotation, Cycle, CycleState, Item, ModelVersion
from services.projects import get_project
from services.recipe import default_recipe
from services.selection.config import SelectionConfig
from services.simulation.config import Arm, SimulationConfig, validate
from services.simulation.data import Dataset, Split, make_split
from services.simulation.deployment import Deployment, ProjectSettings, deploy
from services.simulation.records import RoundRecord, SeedRun, SimulationResult
from services.simulation.summary import summarize


class SimulationFailed(PermanentError):  # noqa: N818 (reads as "the simulation failed")
    """A cycle of a simulated run failed (its reason says why: an unavailable device, ...)."""


def run_seed(
    dataset: Dataset, config: SimulationConfig, arm: Arm, seed: int, minority: int, base: Settings
) -> SeedRun:
    """One arm on one seed, from the initial labels until the budget, the rounds or a plateau
    stop it (or the pool runs out)."""
    with after_loop(dataset, config, arm, seed, minority, base) as (_, _, run):
        return run


@contextmanager
def after_loop(
    dataset: Dataset, config: SimulationConfig, arm: Arm, seed: int, minority: int, base: Settings
) -> Iterator[tuple[Deployment, Split, SeedRun]]:
    """`run_seed`, with its deployment kept open for the block (the labels the loop gathered,
    its dataset versions and models), then removed."""
    split = make_split(dataset, seed=seed, init=config.init, test_fraction=config.test_fraction)
    asked = config.labels_for(arm) - config.init
    settings = ProjectSettings(
        loss=config.loss_settings(arm),
        selection=config.selection_settings(arm),
        batch_size=config.batch,
        label_budget=asked if asked > 0 else None,
        seed=seed,
        noise=config.noise,
    )
    with _deployed(dataset, split, base, settings, seeded=split.init_ids) as deployment:
        yield deployment, split, _drive(deployment, split, config, arm, seed, minority)


@contextmanager
def _deployed(
    dataset: Dataset,
    split: Split,
    base: Settings,
    settings: ProjectSettings,
    *,
    seeded: NDArray[np.int64],
) -> Iterator[Deployment]:
    """The seed's pool in an embedded deployment of its own, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="focalloop-simulation-") as scratch:
        deployment = deploy(
            Path(scratch),
            base,
            items=split.pool_items,
            labels=split.pool_labels,
            n_classes=dataset.n_classes,
            seeded=seeded,
            project=settings,
        )
        try:
            yield deployment
        finally:
            deployment.engine.dispose()


def _drive(
    deployment: Deployment,
    split: Split,
    config: SimulationConfig,
    arm: Arm,
    seed: int,
    minority: int,
) -> SeedRun:
    target = config.labels_for(arm)
    budget = config.budget_for(arm)
    seconds: dict[str, float] = defaultdict(float)
    rounds: list[RoundRecord] = []
    best_val, since_best, cycles = -1.0, 0, 0
    stop_reason = "pool exhausted"
    while cycles <= 2 * (config.rounds + 2):  # a stalled loop must end, not spin
        started = time.perf_counter()
        cycle = maybe_start_cycle(deployment.engine, deployment.project, deployment.settings)
        seconds["trigger"] += time.perf_counter() - started
        if cycle is None:
            break
        cycles += 1
        run_cycle(deployment.engine, cycle.id or 0, deployment.settings, timed=_adder(seconds))
        started = time.perf_counter()
        record = _measure(deployment, cycle.id or 0, split, minority)
        seconds["measure"] += time.perf_counter() - started
        if record is None:
            continue  # a cold start: no model yet
        rounds.append(record)
        if record.labels >= target:
            reached_budget = (
                budget is not None and budget <= config.init + config.rounds * config.batch
            )
            stop_reason = "budget" if reached_budget else "rounds"
            break
        if config.plateau_rounds is not None and record.val_minority_f1 is not None:
            if record.val_minority_f1 > best_val:
                best_val, since_best = record.val_minority_f1, 0
            else:
                since_best += 1
                if since_best >= config.plateau_rounds:
                    stop_reason = "plateau"
                    break
    return SeedRun(
        arm=arm,
        seed=seed,
        rounds=rounds,
        stop_reason=stop_reason,
        noisy_labels=_noisy_labels(deployment, split),
        cycles=cycles,
        seconds=dict(seconds),
    )


def _adder(seconds: dict[str, float]) -> Callable[[Step, float], None]:
    def add(step: Step, spent: float) -> None:
        seconds[step.stage.value] += spent

    return add


def _measure(
    deployment: Deployment, cycle_id: int, split: Split, minority: int
) -> RoundRecord | None:
    """The shipping model after cycle `cycle_id`, on the test split (None before any model)."""
    with session_scope(deployment.engine) as session:
        cycle = session.get(Cycle, cycle_id)
        assert cycle is not None
        if cycle.state == CycleState.FAILED:
            raise SimulationFailed(f"cycle {cycle.number} failed: {cycle.failure_reason}")
        if cycle.model_version is None or cycle.dataset_version is None:
            return None
        project = get_project(session, deployment.project)
        model = session.exec(
            select(ModelVersion).where(
                ModelVersion.project_id == project.id,
                ModelVersion.version == cycle.model_version,
            )
        ).one()
        version = get_version(session, project, cycle.dataset_version)
    checkpoint = load_model(project, model, deployment.settings)
    probs = predict(checkpoint, split.test_items, deployment.settings).probs
    report = evaluate(probs, split.test_labels, minority_class=minority)
    validation = model.metrics.get("validation")
    return RoundRecord(
        labels=int(version.row_count or 0),
        minority_f1=report.minority_f1,
        minority_recall=report.minority_recall,
        macro_f1=report.macro_f1,
        ece=report.ece,
        minority_labels=int((version.class_counts or {}).get(deployment.labels[minority], 0)),
        val_minority_f1=float(validation["per_class"][minority]["f1"]) if validation else None,
        per_class_f1=tuple(scores.f1 for scores in report.per_class),
    )


def _noisy_labels(deployment: Deployment, split: Split) -> int:
    """Answers of the simulated annotator that differ from the truth."""
    with session_scope(deployment.engine) as session:
        rows = session.execute(
            sa.select(col(Item.external_id), col(Annotation.label))
            .join(Item, col(Item.id) == col(Annotation.item_id))
            .where(col(Annotation.source) == "simulated", col(Annotation.label).is_not(None))
        ).all()
    truth = {f"i{i:06d}": deployment.labels[int(y)] for i, y in enumerate(split.pool_labels)}
    return sum(truth[external_id] != label for external_id, label in rows)


def full_pool_minority_f1(
    dataset: Dataset, config: SimulationConfig, seed: int, minority: int, base: Settings
) -> float:
    """Minority F1 on seed s's test split of the default model trained by the product on every
    pool label (the whole pool given as seed labels: one cycle, nothing left to select)."""
    split = make_split(dataset, seed=seed, init=config.init, test_fraction=config.test_fraction)
    settings = ProjectSettings(
        loss=default_recipe().loss.to_dict(),
        selection=SelectionConfig().to_dict(),
        batch_size=config.batch,
        label_budget=None,
        seed=seed,
        noise=0.0,
    )
    everything = np.arange(len(split.pool_labels), dtype=np.int64)
    with _deployed(dataset, split, base, settings, seeded=everything) as deployment:
        cycle = maybe_start_cycle(deployment.engine, deployment.project, deployment.settings)
        assert cycle is not None  # a project's first cycle always starts
        run_cycle(deployment.engine, cycle.id or 0, deployment.settings)
        record = _measure(deployment, cycle.id or 0, split, minority)
    if record is None:
        raise SimulationFailed("the full-pool reference trained no model (one class only?)")
    return record.minority_f1


@dataclass(frozen=True)
class _Job:
    """One seed of one arm, or (arm None) that seed's full-pool reference model."""

    seed: int
    arm: Arm | None


def _run_job(
    dataset: Dataset, config: SimulationConfig, minority: int, job: _Job, base: Settings
) -> SeedRun | tuple[int, float]:
    # `threads` torch threads per run (1 by default): the worker processes already fill the
    # cores, and one thread makes a run's figures independent of the machine's core count.
    with torch_threads(config.threads):
        if job.arm is None:
            return job.seed, full_pool_minority_f1(dataset, config, job.seed, minority, base)
        return run_seed(dataset, config, job.arm, job.seed, minority, base)


def run_simulation(
    dataset: Dataset,
    config: SimulationConfig,
    base: Settings,
    on_progress: Callable[[str], None] | None = None,
) -> SimulationResult:
    """Run every arm on every seed (plus the full-pool reference) across `workers` processes.
    base: the caller's settings (device, ...); each run gets its own database and store.

    With workers > 1 the processes are spawned fresh, so a script calling this must guard its
    entry point with `if __name__ == "__main__":` (the `focalloop` command does).
    """
    minority = validate(dataset, config)
    base = base.model_copy(update={"torch_threads": config.threads})
    jobs = [_Job(seed, None) for seed in range(config.seeds) if config.full_pool_reference]
    jobs += [_Job(seed, arm) for arm in config.arms for seed in range(config.seeds)]
    runs: list[SeedRun] = []
    full_pool: dict[int, float] = {}

    def record(outcome: SeedRun | tuple[int, float]) -> None:
        if isinstance(outcome, SeedRun):
            runs.append(outcome)
            message = f"{outcome.arm.name} seed {outcome.seed}"
        else:
            full_pool[outcome[0]] = outcome[1]
            message = f"full-pool reference seed {outcome[0]}"
        if on_progress is not None:
            on_progress(message)

    workers = max(1, min(config.workers, len(jobs), os.cpu_count() or 1))
    if workers == 1:
        for job in jobs:
            record(_run_job(dataset, config, minority, job, base))
    else:
        # "spawn", not fork: a parent that has already run torch holds an OpenMP thread pool,
        # and forked children deadlock in it (seen: a test session hanging for 18 minutes).
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_run_job, dataset, config, minority, job, base) for job in jobs]
            for future in futures:
                record(future.result())
    result = SimulationResult(
        config=config,
        minority_class=minority,
        n_classes=dataset.n_classes,
        runs=runs,
        full_pool_f1=full_pool,
    )
    result.summary = summarize(result)
    return result
