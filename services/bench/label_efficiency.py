"""`focalloop bench label-efficiency`: how far each arm gets on the demo setting per label.

Digits with digit 8 at 2%, seeds 0..S-1, 20 initial labels, batches of 20. Model-driven arms stop
at 300 labels; random arms go on to 600 so that labels-to-target can be measured for them too.
Reports, per arm: minority F1 and recall at 300 labels, the area under the minority-F1 curve
(over 20..300 labels, the same axis for every arm), and labels-to-target: the labels at which a
seed first reaches its full-pool model's minority F1 (median over seeds, censored at the budget).
"""

import math
from typing import Any

from services.config import Settings
from services.simulation.config import Arm
from services.simulation.demo import BATCH, BUDGET, INIT, demo_config, digits_with_rare_class
from services.simulation.records import SeedRun, SimulationResult
from services.simulation.run import run_simulation
from services.simulation.summary import area_under_minority_f1, labels_to_target, mean_ci95

BENCH_ARMS = (
    Arm("default", "focal"),
    Arm("default", "ce"),
    Arm("least_confidence", "focal"),
    Arm("least_confidence", "ce"),
    Arm("random", "focal"),
    Arm("random", "ce"),
)
RANDOM_BUDGET = 600


def _at(run: SeedRun, labels: int, metric: str) -> float:
    """The metric of the last round with at most `labels` labels."""
    value = getattr(run.rounds[0], metric)
    for record in run.rounds:
        if record.labels <= labels:
            value = getattr(record, metric)
    return float(value)


def _median_labels(values: list[int | None]) -> float:
    ordered = sorted(math.inf if v is None else v for v in values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2


def summarize_bench(result: SimulationResult) -> dict[str, Any]:
    axis = list(range(INIT, BUDGET + 1, BATCH))
    arms: dict[str, Any] = {}
    for arm in result.config.arms:
        runs = sorted((r for r in result.runs if r.arm == arm), key=lambda r: r.seed)
        reached = [labels_to_target(run, result.full_pool_f1[run.seed]) for run in runs]
        budget = result.config.budget_for(arm) or BUDGET
        median = _median_labels(reached)
        arms[arm.name] = {
            "minority_f1_at_300": mean_ci95([_at(r, BUDGET, "minority_f1") for r in runs]),
            "minority_recall_at_300": mean_ci95([_at(r, BUDGET, "minority_recall") for r in runs]),
            "macro_f1_at_300": mean_ci95([_at(r, BUDGET, "macro_f1") for r in runs]),
            "auc_minority_f1_20_300": mean_ci95([area_under_minority_f1(r, axis) for r in runs]),
            "labels_to_target_median": median if math.isfinite(median) else None,
            "labels_to_target_censored_at": budget,
            "labels_to_target_per_seed": reached,
            "minority_labels_at_300": mean_ci95(
                [_at(r, BUDGET, "minority_labels") for r in runs], bounds=None
            ),
        }
    default, random = arms["default/focal"], arms["random/focal"]
    ratio = None
    if default["labels_to_target_median"] is not None:
        # A censored random median means random needs more than its budget: the ratio is then
        # an upper bound (default / budget), reported as such.
        denominator = random["labels_to_target_median"] or RANDOM_BUDGET
        ratio = default["labels_to_target_median"] / denominator
    return {
        "setting": "digits, digit 8 at 2% (98:2), 20 initial labels, batches of 20, "
        "simulated annotator",
        "seeds": result.config.seeds,
        "full_pool_minority_f1": mean_ci95(list(result.full_pool_f1.values())),
        "arms": arms,
        "labels_to_target_ratio_default_vs_random": ratio,
        "labels_to_target_ratio_is_upper_bound": random["labels_to_target_median"] is None,
        "goal_minority_f1_at_300": 0.90,
        "goal_labels_to_target_ratio": 1 / 3,
    }


def run_label_efficiency_bench(
    base: Settings, *, seeds: int = 5, workers: int = 2
) -> tuple[SimulationResult, dict[str, Any]]:
    config = demo_config(
        arms=BENCH_ARMS,
        seeds=seeds,
        workers=workers,
        full_pool_reference=True,
        random_budget=RANDOM_BUDGET,
    )
    result = run_simulation(digits_with_rare_class(), config, base)
    return result, summarize_bench(result)
