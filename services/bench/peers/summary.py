"""The peer benchmark's figures per setting: each arm's mean rare-class F1 over the curve
(20-300 labels) and at 300 labels, the paired differences (by seed) of focalloop against the
best peer arm and of focal loss against cross-entropy, and where focalloop's mean curve is not
above random's."""

from collections import defaultdict
from typing import Any

import numpy as np

from services.bench.peers.run import LABELS_AXIS, Curve, PeerResults
from services.simulation.summary import mean_ci95

PRODUCT = "focalloop"
RANDOM = "skactiveml-random/mlp"
GOAL_MEAN, GOAL_LOW = 0.0, -0.02  # the paired difference's mean and its 95% interval's low end
ABOVE_RANDOM_FROM = 60  # labels from which focalloop's mean curve must be above random's


def _paired(
    mine: dict[int, Curve], theirs: dict[int, Curve], *, at: int | None = None
) -> dict[str, Any]:
    """Mean and t-interval over the seeds both arms ran of (mine - theirs): the mean over the
    curve, or the value at axis index `at`."""
    seeds = sorted(set(mine) & set(theirs))

    def figure(curve: Curve) -> float:
        return float(np.mean(curve.rare_f1)) if at is None else curve.rare_f1[at]

    differences = [figure(mine[s]) - figure(theirs[s]) for s in seeds]
    return {**mean_ci95(differences, bounds=None), "seeds": len(seeds)}


def summarize_setting(curves: list[Curve]) -> dict[str, Any]:
    """Figures of one setting's curves (any arms, any seeds)."""
    by_arm: dict[str, dict[int, Curve]] = defaultdict(dict)
    for curve in curves:
        by_arm[curve.arm][curve.seed] = curve
    arms: dict[str, Any] = {}
    for arm, runs in by_arm.items():
        ordered = [runs[seed] for seed in sorted(runs)]
        arms[arm] = {
            "seeds": len(ordered),
            "mean_rare_f1_20_300": mean_ci95([float(np.mean(c.rare_f1)) for c in ordered]),
            "rare_f1_at_300": mean_ci95([c.rare_f1[-1] for c in ordered]),
            "mean_curve": [float(v) for v in np.mean([c.rare_f1 for c in ordered], axis=0)],
            # None where the curves were reused from an earlier run (not timed in this one).
            "median_seconds_per_run": None
            if any(np.isnan(c.seconds) for c in ordered)
            else float(np.median([c.seconds for c in ordered])),
        }
    out: dict[str, Any] = {"labels_axis": list(LABELS_AXIS), "arms": arms}
    peers = [arm for arm in arms if not arm.startswith(PRODUCT)]
    if PRODUCT in arms and peers:
        best = max(peers, key=lambda arm: arms[arm]["mean_rare_f1_20_300"]["mean"])
        difference = _paired(by_arm[PRODUCT], by_arm[best])
        out["best_peer"] = best
        out["vs_best_peer"] = {
            "mean_rare_f1_20_300": difference,
            "rare_f1_at_300": _paired(by_arm[PRODUCT], by_arm[best], at=len(LABELS_AXIS) - 1),
            "goal_met": difference["mean"] >= GOAL_MEAN and difference["ci95"][0] >= GOAL_LOW,
        }
    if PRODUCT in arms and RANDOM in arms:
        below = [
            point
            for point, mine, theirs in zip(
                LABELS_AXIS, arms[PRODUCT]["mean_curve"], arms[RANDOM]["mean_curve"], strict=True
            )
            if point >= ABOVE_RANDOM_FROM and mine <= theirs
        ]
        out["not_above_random_at"] = below
    if PRODUCT in arms and f"{PRODUCT}/ce" in arms:
        out["focal_minus_ce"] = _paired(by_arm[PRODUCT], by_arm[f"{PRODUCT}/ce"])
    return out


def summarize(results: PeerResults) -> dict[str, Any]:
    """setting name -> its figures."""
    by_setting: dict[str, list[Curve]] = defaultdict(list)
    for curve in results.curves:
        by_setting[curve.setting].append(curve)
    return {name: summarize_setting(curves) for name, curves in by_setting.items()}
