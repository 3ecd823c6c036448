"""`focalloop simulate`: run the loop against a simulated annotator and compare arms.

An arm is a (strategy, loss) pair. Every arm runs on the same seeds 0..S-1; seed s fixes the
test split, the initial labels and the annotator's noise, so arms differ only in what they pick
and how they train. Each round trains on the labels so far, evaluates on the test split, then
picks the next batch. Hyperparameters (early stopping, temperature) use a validation split
carved from the labeled items only; the test split is never looked at for any decision.

All labels come from `labeling.simulated.SimulatedAnnotator`; results say `"simulated": true`.
"""

import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import stats
from sklearn.model_selection import train_test_split

from labeling.simulated import SimulatedAnnotator
from services.errors import InvalidInput
from services.loop import (
    LabeledSet,
    LoopConfig,
    SelectionConfig,
    choose_batch,
    default_loop_config,
    ingest,
    train_stage,
)
from services.ml.losses import ALPHA_SCHEMES, AlphaScheme
from services.ml.metrics import default_minority_class, evaluate
from services.ml.nets import ModelSpec, spec_for_inputs
from services.ml.score import score
from services.ml.train import LossSpec, TrainResult, torch_threads

LossKind = Literal["focal", "ce"]
DEFAULT_STRATEGY = "default"
METRICS = ("minority_f1", "minority_recall", "macro_f1", "ece")


@dataclass(frozen=True)
class Dataset:
    """Arrays from FILE.npz: pool items [n, ...] float32 and labels [n] int64; optional fixed
    test split. Item shape: (d,) features, (H, W) or (C, H, W) images."""

    items: NDArray[np.float32]
    labels: NDArray[np.int64]
    test_items: NDArray[np.float32] | None = None
    test_labels: NDArray[np.int64] | None = None

    @property
    def n_classes(self) -> int:
        top = int(self.labels.max())
        if self.test_labels is not None and len(self.test_labels):
            top = max(top, int(self.test_labels.max()))
        return top + 1


def _integer_labels(array: NDArray[Any], name: str) -> NDArray[np.int64]:
    if array.ndim != 1:
        raise InvalidInput(f"{name} must be a 1-d array of labels, got shape {array.shape}")
    whole_floats = np.issubdtype(array.dtype, np.floating) and np.all(np.mod(array, 1) == 0)
    if not np.issubdtype(array.dtype, np.integer) and not whole_floats:
        raise InvalidInput(f"{name} must hold integer class labels, got {array.dtype}")
    if array.size and array.min() < 0:
        raise InvalidInput(f"{name} must hold class indices >= 0")
    return array.astype(np.int64)


def _item_array(array: NDArray[Any], name: str) -> NDArray[np.float32]:
    if array.ndim not in (2, 3, 4):
        raise InvalidInput(
            f"{name} must be features [n, d] or images [n, H, W] / [n, C, H, W], "
            f"got shape {array.shape}"
        )
    if not (np.issubdtype(array.dtype, np.number) and np.all(np.isfinite(array))):
        raise InvalidInput(f"{name} must hold finite numbers")
    return array.astype(np.float32)


def load_dataset(path: Path) -> Dataset:
    """Read and validate FILE.npz (X, y, optionally X_test, y_test); InvalidInput otherwise."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InvalidInput(f"no such file: {path}") from None
    except (OSError, ValueError) as error:
        raise InvalidInput(f"{path} is not a readable .npz file: {error}") from None
    with archive:
        missing = [key for key in ("X", "y") if key not in archive.files]
        if missing:
            raise InvalidInput(f"{path} lacks the array(s) {', '.join(missing)}; it needs X and y")
        items, labels = _item_array(archive["X"], "X"), _integer_labels(archive["y"], "y")
        if len(items) != len(labels):
            raise InvalidInput(f"X has {len(items)} items but y has {len(labels)} labels")
        has_test = ("X_test" in archive.files, "y_test" in archive.files)
        if any(has_test) and not all(has_test):
            raise InvalidInput("give both X_test and y_test, or neither")
        test_items = test_labels = None
        if all(has_test):
            test_items = _item_array(archive["X_test"], "X_test")
            test_labels = _integer_labels(archive["y_test"], "y_test")
            if test_items.shape[1:] != items.shape[1:] or len(test_items) != len(test_labels):
                raise InvalidInput("X_test/y_test do not match X/y in item shape or length")
    return Dataset(items, labels, test_items, test_labels)


@dataclass(frozen=True)
class Arm:
    """strategy: "default" (the project default configuration) or a strategy name, run as plain
    top-k without wrappers; loss: "focal" (with the configured gamma/alpha) or "ce" (plain
    cross-entropy)."""

    strategy: str
    loss: LossKind

    @property
    def name(self) -> str:
        return f"{self.strategy}/{self.loss}"


@dataclass(frozen=True)
class SimulationConfig:
    """What to run. budget: stop once this many labels are in (None = rounds decide);
    random_budget: a larger budget for random arms (labels-to-target needs them to go far);
    full_pool_reference: also train the default model on each seed's whole pool; its minority
    F1 is the target of labels-to-target (without it, labels-to-target is not computed).
    plateau_rounds: stop when validation minority F1 has not improved for this many rounds;
    it judges only rounds trained with a validation split (with the default training settings,
    from 500 labels on), so below that it never fires."""

    arms: tuple[Arm, ...]
    seeds: int = 5
    rounds: int = 15
    batch: int = 20
    init: int = 20
    budget: int | None = None
    random_budget: int | None = None
    rare_class: int | None = None
    gamma: float | None = None
    alpha: AlphaScheme | None = None
    noise: float = 0.0
    plateau_rounds: int | None = None
    test_fraction: float = 0.3
    workers: int = 2
    full_pool_reference: bool = True

    def loop_config(self, arm: Arm) -> LoopConfig:
        base = default_loop_config()
        loss = base.loss
        if arm.loss == "ce":
            loss = LossSpec(kind="ce", gamma=0.0, alpha=None, prior_bias=False)
        else:
            if self.gamma is not None:
                loss = replace(loss, gamma=self.gamma)
            if self.alpha is not None:
                loss = replace(loss, alpha=self.alpha)
        selection = base.selection
        if arm.strategy != DEFAULT_STRATEGY:
            selection = SelectionConfig(
                strategy=arm.strategy, oversample=None, quota_min_share=None, explore_share=0.0
            )
        return replace(base, loss=loss, selection=selection, batch_size=self.batch)

    def budget_for(self, arm: Arm) -> int | None:
        if arm.strategy == "random" and self.random_budget is not None:
            return self.random_budget
        return self.budget


@dataclass(frozen=True)
class RoundRecord:
    labels: int
    minority_f1: float
    minority_recall: float
    macro_f1: float
    ece: float
    minority_labels: int
    val_minority_f1: float | None


@dataclass(frozen=True)
class SeedRun:
    arm: Arm
    seed: int
    rounds: list[RoundRecord]
    stop_reason: str
    noisy_labels: int


@dataclass(frozen=True)
class _Split:
    pool_items: NDArray[np.float32]
    pool_labels: NDArray[np.int64]
    test_items: NDArray[np.float32]
    test_labels: NDArray[np.int64]
    init_ids: NDArray[np.int64]


def make_split(dataset: Dataset, *, seed: int, init: int, test_fraction: float) -> _Split:
    """Seed s's pool/test split (stratified) and its initial labeled ids (uniform, seeded)."""
    if dataset.test_items is not None and dataset.test_labels is not None:
        pool_items, pool_labels = dataset.items, dataset.labels
        test_items, test_labels = dataset.test_items, dataset.test_labels
    else:
        counts = np.bincount(dataset.labels)
        stratify = dataset.labels if counts[counts > 0].min() >= 2 else None
        pool_items, test_items, pool_labels, test_labels = train_test_split(
            dataset.items,
            dataset.labels,
            test_size=test_fraction,
            random_state=seed,
            stratify=stratify,
        )
    rng = np.random.default_rng(seed)
    init_ids = np.sort(
        rng.choice(len(pool_labels), size=min(init, len(pool_labels)), replace=False)
    ).astype(np.int64)
    return _Split(pool_items, pool_labels, test_items, test_labels, init_ids)


def _spec(dataset: Dataset) -> ModelSpec:
    return spec_for_inputs(dataset.items.shape[1:], dataset.n_classes)


def _validation_minority_f1(
    model: TrainResult, items: NDArray[np.float32], dataset: LabeledSet, minority: int
) -> float | None:
    if len(model.val_indices) == 0:
        return None
    val_ids = dataset.item_ids[model.val_indices]
    probs = score(model.model, items[val_ids], spec=model.spec, temperature=model.temperature).probs
    return evaluate(probs, dataset.labels[model.val_indices], minority_class=minority).minority_f1


def run_seed(
    dataset: Dataset, config: SimulationConfig, arm: Arm, seed: int, minority: int
) -> SeedRun:
    """One arm on one seed, from the initial labels until a stopping rule fires."""
    split = make_split(dataset, seed=seed, init=config.init, test_fraction=config.test_fraction)
    loop = config.loop_config(arm)
    spec = _spec(dataset)
    annotator = SimulatedAnnotator(
        split.pool_labels, n_classes=spec.n_classes, noise=config.noise, seed=seed
    )
    answers = annotator.annotate(split.init_ids)
    labeled = ingest(LabeledSet.empty(), [a.item_id for a in answers], [a.label for a in answers])
    noisy = sum(a.label != a.true_label for a in answers)
    budget = config.budget_for(arm)
    rounds: list[RoundRecord] = []
    best_val, since_best = -1.0, 0
    stop_reason = "rounds"
    model: TrainResult | None = None
    for round_index in range(config.rounds + 1):
        model = train_stage(
            previous=model,
            items=split.pool_items,
            dataset=labeled,
            spec=spec,
            config=loop,
            seed=seed,
        )
        probs: NDArray[np.floating[Any]] = score(
            model.model, split.test_items, spec=spec, temperature=model.temperature
        ).probs
        unlabeled = np.setdiff1d(np.arange(len(split.pool_labels)), labeled.item_ids)
        report = evaluate(probs, split.test_labels, minority_class=minority)
        val_f1 = _validation_minority_f1(model, split.pool_items, labeled, minority)
        rounds.append(
            RoundRecord(
                labels=len(labeled),
                minority_f1=report.minority_f1,
                minority_recall=report.minority_recall,
                macro_f1=report.macro_f1,
                ece=report.ece,
                minority_labels=int(np.sum(labeled.labels == minority)),
                val_minority_f1=val_f1,
            )
        )
        if budget is not None and len(labeled) >= budget:
            stop_reason = "budget"
            break
        if config.plateau_rounds is not None and val_f1 is not None:
            if val_f1 > best_val:
                best_val, since_best = val_f1, 0
            else:
                since_best += 1
                if since_best >= config.plateau_rounds:
                    stop_reason = "plateau"
                    break
        if round_index == config.rounds:
            break
        if len(unlabeled) == 0:
            stop_reason = "pool exhausted"
            break
        size = config.batch if budget is None else min(config.batch, budget - len(labeled))
        batch = choose_batch(
            model=model,
            items=split.pool_items,
            unlabeled_ids=unlabeled,
            dataset=labeled,
            n_classes=spec.n_classes,
            config=loop,
            batch_size=size,
            seed=seed * 1000 + round_index,
        )
        answers = annotator.annotate(batch.selected)
        noisy += sum(a.label != a.true_label for a in answers)
        labeled = ingest(labeled, [a.item_id for a in answers], [a.label for a in answers])
    return SeedRun(arm=arm, seed=seed, rounds=rounds, stop_reason=stop_reason, noisy_labels=noisy)


def full_pool_minority_f1(
    dataset: Dataset, config: SimulationConfig, seed: int, minority: int
) -> float:
    """Minority F1 on seed s's test split of the default model trained on every pool label."""
    split = make_split(dataset, seed=seed, init=config.init, test_fraction=config.test_fraction)
    loop = default_loop_config()
    all_labels = LabeledSet(1, np.arange(len(split.pool_labels), dtype=np.int64), split.pool_labels)
    model = train_stage(
        items=split.pool_items, dataset=all_labels, spec=_spec(dataset), config=loop, seed=seed
    )
    probs = score(
        model.model, split.test_items, spec=model.spec, temperature=model.temperature
    ).probs
    return evaluate(probs, split.test_labels, minority_class=minority).minority_f1


@dataclass(frozen=True)
class _Job:
    """One seed of one arm, or (arm None) that seed's full-pool reference model."""

    seed: int
    arm: Arm | None


def _run_job(
    dataset: Dataset, config: SimulationConfig, minority: int, job: _Job
) -> SeedRun | tuple[int, float]:
    # One torch thread per worker process: the workers already fill the cores.
    with torch_threads(1):
        if job.arm is None:
            return job.seed, full_pool_minority_f1(dataset, config, job.seed, minority)
        return run_seed(dataset, config, job.arm, job.seed, minority)


def mean_ci95(
    values: Sequence[float], *, bounds: tuple[float, float] | None = (0.0, 1.0)
) -> dict[str, Any]:
    """Mean and a t-based 95% confidence interval over seeds ([mean, mean] for one seed).

    bounds: the metric's range; the interval is clipped to it (a recall cannot exceed 1, even
    when a symmetric t-interval over 5 seeds would say so). None for unbounded quantities.
    """
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    if len(array) < 2:
        return {"mean": mean, "ci95": [mean, mean]}
    half = float(stats.t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array)))
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return {"mean": mean, "ci95": [low, high]}


def _curve(run: SeedRun, labels_axis: Sequence[int], metric: str) -> list[float]:
    # A run that stopped early keeps its last model: carry its last value forward.
    values: list[float] = []
    by_labels = {r.labels: getattr(r, metric) for r in run.rounds}
    last = getattr(run.rounds[0], metric)
    for labels in labels_axis:
        last = by_labels.get(labels, last)
        values.append(float(last))
    return values


def labels_to_target(run: SeedRun, target: float) -> int | None:
    """Labels at the first round whose minority F1 reaches `target`; None if never."""
    for record in run.rounds:
        if record.minority_f1 >= target:
            return record.labels
    return None


def area_under_minority_f1(run: SeedRun, labels_axis: Sequence[int]) -> float:
    """Mean minority F1 over the label axis (trapezoids, normalized by its span): 1.0 = perfect
    from the first round on."""
    values = _curve(run, labels_axis, "minority_f1")
    if len(labels_axis) < 2:
        return values[0]
    return float(np.trapezoid(values, labels_axis) / (labels_axis[-1] - labels_axis[0]))


@dataclass
class SimulationResult:
    config: SimulationConfig
    minority_class: int
    n_classes: int
    runs: list[SeedRun]
    full_pool_f1: dict[int, float]
    summary: dict[str, Any] = field(default_factory=dict)


def _arm_summary(
    arm: Arm,
    runs: list[SeedRun],
    full_pool: dict[int, float],
    budget: int | None,
    auc_axis: Sequence[int],
) -> dict[str, Any]:
    labels_axis = sorted({r.labels for run in runs for r in run.rounds})
    curves = {metric: [_curve(run, labels_axis, metric) for run in runs] for metric in METRICS}
    rounds = []
    for index, labels in enumerate(labels_axis):
        entry: dict[str, Any] = {"labels": labels}
        for metric in METRICS:
            entry[metric] = mean_ci95([curve[index] for curve in curves[metric]])
        rounds.append(entry)
    cap = budget if budget is not None else labels_axis[-1]
    labels_needed: dict[str, Any] | None = None
    if full_pool:
        reached = [labels_to_target(run, full_pool[run.seed]) for run in runs]
        median = float(np.median([math.inf if r is None else r for r in reached]))
        labels_needed = {
            "median": median if math.isfinite(median) else f">{cap}",
            "per_seed": [r if r is not None else f">{cap}" for r in reached],
        }
    return {
        "strategy": arm.strategy,
        "loss": arm.loss,
        "name": arm.name,
        "rounds": rounds,
        "auc_minority_f1": mean_ci95([area_under_minority_f1(run, auc_axis) for run in runs]),
        "auc_labels": [auc_axis[0], auc_axis[-1]],
        "labels_to_target": labels_needed,
        "final_labels": labels_axis[-1],
        "stop_reasons": [run.stop_reason for run in runs],
        "noisy_labels": [run.noisy_labels for run in runs],
    }


def summarize(result: SimulationResult) -> dict[str, Any]:
    config = result.config
    by_arm = {
        arm: sorted((r for r in result.runs if r.arm == arm), key=lambda r: r.seed)
        for arm in config.arms
    }
    # The area is taken over the label counts every arm reached, so arms with different
    # budgets (random going further) are compared on the same span.
    shortest = min(max(r.labels for run in runs for r in run.rounds) for runs in by_arm.values())
    auc_axis = sorted(
        {
            r.labels
            for runs in by_arm.values()
            for run in runs
            for r in run.rounds
            if r.labels <= shortest
        }
    )
    arms = [
        _arm_summary(arm, runs, result.full_pool_f1, config.budget_for(arm), auc_axis)
        for arm, runs in by_arm.items()
    ]
    default = default_loop_config()
    return {
        "simulated": True,
        "annotator": {"kind": "simulated", "noise": config.noise},
        "minority_class": result.minority_class,
        "n_classes": result.n_classes,
        "seeds": list(range(config.seeds)),
        "config": {**asdict(config), "arms": [asdict(a) for a in config.arms]},
        "default_config": {
            "loss": default.loss.to_dict(),
            "train": asdict(default.train),
            "selection": asdict(default.selection),
            "warm_start_steps": default.warm_start_steps,
        },
        "full_pool_minority_f1": {
            **mean_ci95(list(result.full_pool_f1.values())),
            "per_seed": [result.full_pool_f1[s] for s in sorted(result.full_pool_f1)],
        }
        if result.full_pool_f1
        else None,
        "arms": arms,
    }


def with_random_baselines(arms: Sequence[Arm]) -> tuple[Arm, ...]:
    """The arms plus, for every loss among them, a random arm with that loss (once)."""
    out = list(dict.fromkeys(arms))
    for loss in dict.fromkeys(a.loss for a in arms):
        if Arm("random", loss) not in out:
            out.append(Arm("random", loss))
    return tuple(out)


def validate(dataset: Dataset, config: SimulationConfig) -> int:
    """Check the request against the data; returns the minority class."""
    n_classes = dataset.n_classes
    if n_classes < 2:
        raise InvalidInput("y holds a single class: there is nothing to classify")
    if config.rare_class is not None and not (
        0 <= config.rare_class < n_classes and np.any(dataset.labels == config.rare_class)
    ):
        raise InvalidInput(
            f"--rare-class {config.rare_class} does not occur in y "
            f"(classes present: {sorted(set(dataset.labels.tolist()))})"
        )
    pool_size = (
        len(dataset.labels)
        if dataset.test_items is not None
        else int(len(dataset.labels) * (1 - config.test_fraction))
    )
    if config.batch < 1 or config.init < 1 or config.seeds < 1 or config.rounds < 0:
        raise InvalidInput("--batch, --init and --seeds must be >= 1 and --rounds >= 0")
    if config.batch > pool_size - config.init:
        raise InvalidInput(
            f"--batch {config.batch} is larger than the unlabeled pool "
            f"({pool_size - config.init} items after {config.init} initial labels)"
        )
    if config.alpha is not None and config.alpha not in ALPHA_SCHEMES:
        raise InvalidInput(f"--alpha must be one of {', '.join(ALPHA_SCHEMES)}")
    if config.budget is not None and config.budget < config.init:
        raise InvalidInput(f"--budget {config.budget} is below --init {config.init}")
    if config.rare_class is not None:
        return config.rare_class
    return default_minority_class(dataset.labels, n_classes)


def run_simulation(
    dataset: Dataset, config: SimulationConfig, on_progress: Callable[[str], None] | None = None
) -> SimulationResult:
    """Run every arm on every seed (plus the full-pool reference) across `workers` processes.

    With workers > 1 the processes are spawned fresh, so a script calling this must guard its
    entry point with `if __name__ == "__main__":` (the `focalloop` command does).
    """
    minority = validate(dataset, config)
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
            record(_run_job(dataset, config, minority, job))
    else:
        # "spawn", not fork: a parent that has already run torch holds an OpenMP thread pool,
        # and forked children deadlock in it (seen: a test session hanging for 18 minutes).
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_run_job, dataset, config, minority, job) for job in jobs]
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
