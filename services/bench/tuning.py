"""`focalloop bench tune-value` and `bench tune-scaling`: what `focalloop tune` buys, and how its
grid scales with gpu workers.

tune-value, per setting of the peer suite and seed: the product's default loop runs to 300
labels (`after_loop`: the same cycle `bench peers` runs); `tune_project` then runs the guide's
15-cell grid on that project's newest dataset version by k-fold cross-validation; three models
are trained by the product's recipe on the same labels with the same seed: the project default
(gamma 2, effective-number alpha, prior bias), cross-entropy (the simulation's ce arm) and the
tuned setting; each is scored on the seed's test split, which tuning never saw. Rare-class F1 =
the mean F1 over the setting's rare classes.

tune-scaling: wall time of one 15-cell grid (3 x 3 folds) run by `focalloop worker --queues gpu`
with 1 and with 2 pool processes (one torch thread each) on a private redis-server, timed as
the command runs it: from checking the options (loading the labels) through sending the trials
until the last one is in the study, and the summary and plots written; runs alternate between
the two counts.
"""

import multiprocessing
import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import f1_score

from services.bench.peers.run import simulation_config
from services.bench.peers.suite import SETTINGS
from services.config import Settings, child_environment
from services.cycle.seeds import Purpose, derive_seed
from services.datasets.snapshot import snapshot
from services.db import session_scope
from services.ml.nets import spec_for_inputs
from services.ml.score import score
from services.ml.train import LossSpec, torch_threads
from services.projects import get_project
from services.recipe import default_recipe, fit, project_recipe
from services.servers import FOCALLOOP, RedisServer
from services.simulation.config import Arm
from services.simulation.deployment import Deployment, ProjectSettings, deploy
from services.simulation.run import after_loop
from services.tuning.coordinator import tune_project
from services.tuning.run import TuneOptions, celery_dispatch, load_tuning_data
from services.tuning.space import Setting, to_loss

VALUE_SETTINGS = ("digits-img-8@2%", "digits-feat-5@3%", "gen-binary@2%")
ARMS = ("default", "ce", "tuned")


@dataclass(frozen=True)
class ValueRow:
    """One setting x seed: rare-class F1 on the test split per arm, the tuned setting, and the
    class tuning ranked by (the rarest among the labels it was given)."""

    setting: str
    seed: int
    rare_f1: dict[str, float]
    tuned_gamma: float
    tuned_alpha: str
    tuned_on_class: str
    labels: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def value_job(
    setting_name: str, seed: int, base: Settings, folds: int, repeats: int, rank_by: str
) -> ValueRow:
    """One seed of one setting (a process-pool job: names in, a row out). rank_by: what the
    study maximizes, "minority_f1" (`tune`'s default: the class with the fewest labels, which
    after active learning is often not the rare one) or "rare_f1" (the setting's rare class)."""
    setting = SETTINGS[setting_name]
    dataset = setting.build()
    config = simulation_config(setting)
    started = time.perf_counter()
    loop_arm = Arm("default", "focal")
    with (
        torch_threads(1),
        tempfile.TemporaryDirectory(prefix="focalloop-bench-tune-") as scratch,
        after_loop(dataset, config, loop_arm, seed, setting.rare[0], base) as (
            deployment,
            split,
            _,
        ),
    ):
        summary = tune_project(
            deployment.engine,
            deployment.settings,
            deployment.project,
            TuneOptions(folds=folds, repeats=repeats, metric=_metric(rank_by, setting.rare[0])),
            out=Path(scratch) / "tune",
        )
        data = load_tuning_data(deployment.engine, deployment.settings, deployment.project)
        with session_scope(deployment.engine) as session:
            project = get_project(session, deployment.project)
            recipe = project_recipe(project, device=deployment.settings.device, threads=1)
            project_seed = project.seed
        best = Setting(summary["best"]["gamma"], summary["best"]["alpha"])
        losses = {
            "default": default_recipe().loss,
            "ce": LossSpec.from_dict(config.loss_settings(Arm("default", "ce"))),
            "tuned": to_loss(best, default_recipe().loss, rare_class=data.rare_class),
        }
        spec = spec_for_inputs(
            data.items.shape[1:], len(data.class_names), labeled=len(data.labels)
        )
        train_seed = derive_seed(project_seed, data.version, Purpose.TRAIN)
        rare_f1 = {}
        for arm, loss in losses.items():
            result = fit(
                items=data.items,
                labels=data.labels,
                spec=spec,
                recipe=replace(recipe, loss=loss),
                seed=train_seed,
            )
            probs = score(result.model, split.test_items, spec=spec, device="cpu").probs
            per_class = f1_score(
                split.test_labels,
                probs.argmax(1),
                labels=list(setting.rare),
                average=None,
                zero_division=0.0,
            )
            rare_f1[arm] = float(np.mean(per_class))
    return ValueRow(
        setting=setting_name,
        seed=seed,
        rare_f1=rare_f1,
        tuned_gamma=best.gamma,
        tuned_alpha=best.alpha,
        tuned_on_class=summary["minority_class"],
        labels=summary["labels"],
        seconds=time.perf_counter() - started,
    )


def _metric(rank_by: str, rare_class: int) -> str:
    # The deployment names classes "0".."C-1".
    return f"f1:{rare_class}" if rank_by == "rare_f1" else "minority_f1"


def run_value_bench(
    base: Settings,
    *,
    settings: tuple[str, ...] = VALUE_SETTINGS,
    seeds: int = 10,
    workers: int = 2,
    folds: int = 3,
    repeats: int = 1,
    rank_by: str = "minority_f1",
    on_row: Callable[[ValueRow, int, int], None] | None = None,
) -> list[ValueRow]:
    """Every setting x seed, `workers` processes (spawned: torch's OpenMP pool and fork do not
    mix)."""
    base = base.model_copy(update={"torch_threads": 1, "device": "cpu"})
    jobs = [(name, seed) for name in settings for seed in range(seeds)]
    context = multiprocessing.get_context("spawn")
    rows: list[ValueRow] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [
            pool.submit(value_job, name, seed, base, folds, repeats, rank_by) for name, seed in jobs
        ]
        for done, future in enumerate(futures, start=1):
            rows.append(future.result())
            if on_row is not None:
                on_row(rows[-1], done, len(jobs))
    return rows


@dataclass(frozen=True)
class ScalingRow:
    """Median wall seconds of the grid with `workers` pool processes, and every run's."""

    workers: int
    median_seconds: float
    runs: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scaling_project(folder: Path, base: Settings) -> Deployment:
    """A features project (digits as 64 features, digit 5 kept at 3%, 600 items all labeled)
    in an embedded deployment at `folder`, its labels committed as dataset v1."""
    dataset = SETTINGS["digits-feat-5@3%"].build()
    items, labels = dataset.items[:600], dataset.labels[:600]
    deployment = deploy(
        folder,
        base,
        items=items,
        labels=labels,
        n_classes=dataset.n_classes,
        seeded=np.arange(len(labels), dtype=np.int64),
        project=ProjectSettings(
            loss=default_recipe().loss.to_dict(),
            selection={},
            batch_size=20,
            label_budget=None,
            seed=0,
            noise=0.0,
        ),
    )
    with session_scope(deployment.engine) as session:
        snapshot(session, get_project(session, deployment.project), settings=deployment.settings)
    return deployment


def _one_grid(base: Settings, workers: int, folder: Path) -> float:
    deployment = _scaling_project(folder, base)
    redis_server = RedisServer(folder / "redis", append_only=False)
    redis_server.start()
    settings = deployment.settings.model_copy(
        update={"broker_url": redis_server.url, "torch_threads": 1, "device": "cpu"}
    )
    log = folder / "worker.log"
    worker = subprocess.Popen(
        [FOCALLOOP, "worker", "--queues", "gpu", "--concurrency", str(workers)],
        env=child_environment(settings),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while "ready." not in log.read_text(errors="replace"):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"the worker did not start:\n{log.read_text()}")
            time.sleep(0.2)
        started = time.perf_counter()
        tune_project(
            deployment.engine,
            settings,
            deployment.project,
            TuneOptions(),
            out=folder / "out",
            dispatch=celery_dispatch(settings),
            wait_s=600,
            poll_s=0.2,
        )
        return time.perf_counter() - started
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
        redis_server.kill()
        deployment.engine.dispose()


def run_scaling_bench(
    base: Settings, *, repeats: int = 3, worker_counts: tuple[int, ...] = (1, 2)
) -> list[ScalingRow]:
    """`repeats` grids per worker count, the counts alternating (reversed every other round)."""
    runs: dict[int, list[float]] = {count: [] for count in worker_counts}
    with tempfile.TemporaryDirectory(prefix="focalloop-bench-tune-scaling-") as scratch:
        for repeat in range(repeats):
            order = worker_counts if repeat % 2 == 0 else tuple(reversed(worker_counts))
            for count in order:
                folder = Path(scratch) / f"r{repeat}-w{count}"
                runs[count].append(_one_grid(base, count, folder))
    return [
        ScalingRow(count, statistics.median(seconds), seconds) for count, seconds in runs.items()
    ]
