"""The label-efficiency benchmark's arithmetic, on hand-made runs with known answers."""

import pytest

from services.bench.label_efficiency import BENCH_ARMS, _median_labels, summarize_bench
from services.simulation.config import Arm, SimulationConfig
from services.simulation.records import RoundRecord, SeedRun, SimulationResult


def _run(arm: Arm, seed: int, curve: list[tuple[int, float]]) -> SeedRun:
    rounds = [
        RoundRecord(
            labels=n,
            minority_f1=f1,
            minority_recall=f1,
            macro_f1=0.9,
            ece=0.05,
            minority_labels=n // 20,
            val_minority_f1=None,
        )
        for n, f1 in curve
    ]
    return SeedRun(arm=arm, seed=seed, rounds=rounds, stop_reason="budget", noisy_labels=0)


def test_median_labels_treats_never_as_infinite() -> None:
    assert _median_labels([100, None, 60]) == 100
    assert _median_labels([100, 60]) == 80
    assert _median_labels([None, None, 60]) == float("inf")


def test_summary_figures_and_ratio() -> None:
    config = SimulationConfig(arms=BENCH_ARMS, seeds=2, budget=300, random_budget=600)
    fast = [(20, 0.1), (160, 0.85), (300, 0.95)]
    slow = [(20, 0.1), (300, 0.5), (480, 0.85), (600, 0.9)]
    runs = [
        _run(arm, seed, slow if arm.strategy == "random" else fast)
        for arm in BENCH_ARMS
        for seed in (0, 1)
    ]
    result = SimulationResult(
        config=config, minority_class=8, n_classes=10, runs=runs, full_pool_f1={0: 0.8, 1: 0.8}
    )
    figures = summarize_bench(result)
    default = figures["arms"]["default/focal"]
    assert default["labels_to_target_median"] == 160
    assert default["minority_f1_at_300"]["mean"] == pytest.approx(0.95)
    random = figures["arms"]["random/focal"]
    assert random["labels_to_target_median"] == 480
    assert random["minority_f1_at_300"]["mean"] == pytest.approx(0.5)
    assert figures["labels_to_target_ratio_default_vs_random"] == pytest.approx(160 / 480)
    assert figures["labels_to_target_ratio_is_upper_bound"] is False
