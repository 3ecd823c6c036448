"""`focalloop bench peers`: focalloop's product path against scikit-activeml on the suite.

For every setting and seed s, every arm starts from seed s's split and initial labels (the
simulation's `make_split`), and the annotator gives every arm the same answers. focalloop's arms
run the product's own cycle (`services.simulation.run.run_seed`: an embedded deployment, beat's
trigger, the stages a worker runs, the simulated labeler); the peers run scikit-activeml in the
same process tree. Jobs (setting x seed x arm) are spread over `workers` spawned processes, each
with one torch thread.
"""

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from services.bench.peers.peer import PEER_ARMS, run_peer
from services.bench.peers.suite import SETTINGS, Setting
from services.config import Settings
from services.errors import InvalidInput
from services.ml.train import torch_threads
from services.simulation.config import Arm, SimulationConfig, validate
from services.simulation.data import make_split
from services.simulation.run import run_seed

INIT, BATCH, BUDGET = 20, 20, 300
LABELS_AXIS = tuple(range(INIT, BUDGET + 1, BATCH))  # the curve's points: 20, 40, ..., 300
PRODUCT_ARMS: dict[str, Arm] = {
    "focalloop": Arm("default", "focal"),
    "focalloop/ce": Arm("default", "ce"),
    # The product with random selection: not run by default (the peers' random arm is the
    # reference); the CI regression test is shown to fail with it.
    "focalloop-random": Arm("random", "focal"),
}
ARMS = (*PRODUCT_ARMS, *PEER_ARMS)
DEFAULT_ARMS = tuple(arm for arm in ARMS if arm != "focalloop-random")


@dataclass(frozen=True)
class Curve:
    """One arm on one seed of one setting: rare-class F1 [len(LABELS_AXIS)] on the test split at
    each point of the label axis (a run's last value carried forward), and its wall seconds."""

    setting: str
    arm: str
    seed: int
    rare_f1: tuple[float, ...]
    seconds: float


@dataclass
class PeerResults:
    curves: list[Curve] = field(default_factory=list)


def _on_axis(labels: list[int], scores: list[float]) -> tuple[float, ...]:
    """Scores measured at `labels` read at each point of the axis: the value of the last
    measurement with at most that many labels."""
    out: list[float] = []
    for point in LABELS_AXIS:
        seen = [score for count, score in zip(labels, scores, strict=True) if count <= point]
        out.append(seen[-1] if seen else 0.0)
    return tuple(out)


def simulation_config(setting: Setting) -> SimulationConfig:
    """The schedule both sides follow: 20 initial labels, batches of 20, up to 300 labels."""
    return SimulationConfig(
        arms=tuple(PRODUCT_ARMS.values()),
        seeds=1,
        rounds=(BUDGET - INIT) // BATCH,
        batch=BATCH,
        init=INIT,
        budget=BUDGET,
        rare_class=setting.rare[0],
        noise=setting.noise,
        workers=1,
        full_pool_reference=False,
    )


def run_job(setting_name: str, arm_name: str, seed: int, base: Settings) -> Curve:
    """One arm on one seed of one setting (a process-pool job: names in, a curve out)."""
    setting = SETTINGS[setting_name]
    dataset = setting.build()
    config = simulation_config(setting)
    started = time.perf_counter()
    with torch_threads(1):
        if arm_name in PRODUCT_ARMS:
            run = run_seed(dataset, config, PRODUCT_ARMS[arm_name], seed, setting.rare[0], base)
            labels = [record.labels for record in run.rounds]
            scores = [
                float(np.mean([record.per_class_f1[c] for c in setting.rare]))
                for record in run.rounds
            ]
        else:
            split = make_split(dataset, seed=seed, init=INIT, test_fraction=config.test_fraction)
            labels, scores = run_peer(
                PEER_ARMS[arm_name],
                split,
                n_classes=dataset.n_classes,
                rare=setting.rare,
                noise=setting.noise,
                seed=seed,
                batch=BATCH,
                budget=BUDGET,
            )
    return Curve(
        setting_name, arm_name, seed, _on_axis(labels, scores), time.perf_counter() - started
    )


def check_request(settings: list[str], arms: list[str], seeds: int) -> None:
    """InvalidInput naming what is unknown; each setting's data is checked as `simulate` would."""
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown:
        raise InvalidInput(f"unknown setting(s) {unknown}; choose from {sorted(SETTINGS)}")
    unknown = [name for name in arms if name not in ARMS]
    if unknown:
        raise InvalidInput(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if seeds < 2:
        raise InvalidInput("--seeds must be at least 2 (intervals need them)")
    for name in settings:
        validate(SETTINGS[name].build(), simulation_config(SETTINGS[name]))


def run_peers(
    base: Settings,
    *,
    settings: list[str],
    arms: list[str],
    seeds: int,
    workers: int,
    on_progress: Callable[[Curve, int, int], None] | None = None,
    reused: Sequence[Curve] = (),
) -> PeerResults:
    """Every arm on seeds 0..seeds-1 of every setting. base: the caller's settings (device);
    each product run gets its own database and store. reused: curves taken as they are (an
    earlier run's peers); their jobs are not run."""
    check_request(settings, arms, seeds)
    done_before = {(curve.setting, curve.arm, curve.seed) for curve in reused}
    base = base.model_copy(update={"torch_threads": 1})
    # The product's runs are the long ones: submitted first, so the peers fill the gaps.
    jobs = sorted(
        (
            (name, arm, seed)
            for name in settings
            for arm in arms
            for seed in range(seeds)
            if (name, arm, seed) not in done_before
        ),
        key=lambda job: job[1] not in PRODUCT_ARMS,
    )
    results = PeerResults(curves=list(reused))
    if not jobs:
        return results
    workers = max(1, min(workers, len(jobs), os.cpu_count() or 1))
    # "spawn": a parent that has run torch holds an OpenMP pool that forked children deadlock in.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(run_job, name, arm, seed, base) for name, arm, seed in jobs]
        for done, future in enumerate(futures, start=1):
            curve = future.result()
            results.curves.append(curve)
            if on_progress is not None:
                on_progress(curve, done, len(jobs))
    return results
