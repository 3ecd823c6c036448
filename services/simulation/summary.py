"""Aggregating runs: means with t-intervals over seeds, learning curves on a common label axis,
the area under the minority-F1 curve, labels-to-target, and the summary `results.json` holds."""

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
from scipy import stats

from services.recipe import default_recipe
from services.simulation.config import Arm
from services.simulation.records import METRICS, SeedRun, SimulationResult


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
    default = default_recipe()
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
