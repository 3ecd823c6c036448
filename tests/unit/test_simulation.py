"""`simulate` and `demo` (the product's cycle with the simulated labeler): input validation,
exact aggregation, outputs, and the headline claim."""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import stats

from services.config import Settings
from services.errors import InvalidInput
from services.simulation.config import Arm, SimulationConfig, with_random_baselines
from services.simulation.data import Dataset, load_dataset
from services.simulation.demo import digits_with_rare_class
from services.simulation.records import RoundRecord, SeedRun
from services.simulation.report import plot_learning_curves, write_results
from services.simulation.run import run_simulation
from services.simulation.summary import area_under_minority_f1, labels_to_target, mean_ci95
from tests.conftest import Digits

FOCALLOOP = str(Path(sys.executable).with_name("focalloop"))


def _record(labels: int, f1: float) -> RoundRecord:
    return RoundRecord(
        labels=labels,
        minority_f1=f1,
        minority_recall=f1,
        macro_f1=f1,
        ece=0.1,
        minority_labels=0,
        val_minority_f1=None,
    )


def test_mean_ci95_is_the_t_interval() -> None:
    values = [0.5, 0.7, 0.6, 0.9]
    half = stats.t.ppf(0.975, 3) * np.std(values, ddof=1) / 2
    result = mean_ci95(values)
    assert result["mean"] == pytest.approx(0.675)
    assert result["ci95"] == pytest.approx([0.675 - half, 0.675 + half])
    assert mean_ci95([0.3]) == {"mean": 0.3, "ci95": [0.3, 0.3]}
    assert mean_ci95([0.9, 1.0, 1.0])["ci95"][1] == 1.0  # a rate's interval stops at 1
    assert mean_ci95([90.0, 100.0, 110.0], bounds=None)["ci95"][1] > 110


def test_labels_to_target_and_area_are_exact() -> None:
    run = SeedRun(
        arm=Arm("default", "focal"),
        seed=0,
        stop_reason="budget",
        noisy_labels=0,
        rounds=[_record(20, 0.2), _record(40, 0.6), _record(60, 0.8)],
    )
    assert labels_to_target(run, 0.6) == 40
    assert labels_to_target(run, 0.81) is None
    # Trapezoids over 20..60: (0.2+0.6)/2*20 + (0.6+0.8)/2*20 = 22, over a span of 40.
    assert area_under_minority_f1(run, [20, 40, 60]) == pytest.approx(22 / 40)
    # Past its last round a run keeps its last value: 0.8 from 60 to 100.
    assert area_under_minority_f1(run, [20, 40, 60, 100]) == pytest.approx((22 + 32) / 80)


def test_random_baselines_are_added_once_per_loss() -> None:
    arms = with_random_baselines(
        [Arm("default", "focal"), Arm("margin", "focal"), Arm("default", "ce"), Arm("random", "ce")]
    )
    assert [a.name for a in arms] == [
        "default/focal",
        "margin/focal",
        "default/ce",
        "random/ce",
        "random/focal",
    ]


def _npz(path: Path, **arrays: NDArray[Any]) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.zeros((10, 3))}, "lacks the array(s) y"),
        ({"X": np.zeros(10), "y": np.zeros(10, dtype=int)}, "features [n, d] or images"),
        ({"X": np.zeros((10, 3)), "y": np.full(10, 0.5)}, "integer class labels"),
        ({"X": np.zeros((10, 3)), "y": np.zeros(9, dtype=int)}, "10 items but y has 9"),
        ({"X": np.full((10, 3), np.nan), "y": np.zeros(10, dtype=int)}, "finite numbers"),
        (
            {"X": np.zeros((10, 3)), "y": np.zeros(10, dtype=int), "X_test": np.zeros((2, 3))},
            "both X_test and y_test",
        ),
    ],
)
def test_bad_files_are_refused(
    tmp_path: Path, arrays: dict[str, NDArray[Any]], message: str
) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        load_dataset(_npz(tmp_path / "data.npz", **arrays))


def test_missing_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no such file"):
        load_dataset(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    with pytest.raises(InvalidInput, match=r"not a readable \.npz"):
        load_dataset(tmp_path / "junk.npz")


def test_requests_that_do_not_fit_the_data_are_refused(digits: Digits) -> None:
    data = Dataset(digits.features[:200], digits.labels[:200])
    arms = (Arm("default", "focal"),)
    with pytest.raises(InvalidInput, match="--rare-class 12 does not occur"):
        run_simulation(data, SimulationConfig(arms=arms, rare_class=12), Settings())
    with pytest.raises(InvalidInput, match="--batch 500 is larger than the unlabeled pool"):
        run_simulation(data, SimulationConfig(arms=arms, batch=500), Settings())
    repeated = Dataset(np.concatenate([data.items, data.items[:3]]), np.arange(203) % 10)
    with pytest.raises(InvalidInput, match="repeated rows"):
        run_simulation(repeated, SimulationConfig(arms=arms), Settings())


def test_cli_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    data = _npz(tmp_path / "data.npz", X=np.zeros((30, 4)), y=np.arange(30) % 3)
    for extra, message in [
        (["--rare-class", "7"], "--rare-class 7 does not occur"),
        (["--batch", "100"], "--batch 100 is larger than the unlabeled pool"),
        (["--strategy", "coreset"], "unknown --strategy 'coreset'"),
        (["--loss", "hinge"], "unknown --loss 'hinge'"),
    ]:
        result = subprocess.run(
            [FOCALLOOP, "simulate", "--data", str(data), "--out", str(tmp_path / "out"), *extra],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_simulation_writes_results_and_plot(tmp_path: Path, digits: Digits) -> None:
    data = Dataset(digits.features[:400], digits.labels[:400])
    config = SimulationConfig(
        arms=(Arm("default", "focal"), Arm("random", "focal")),
        seeds=2,
        rounds=2,
        batch=10,
        init=20,
        rare_class=3,
        workers=1,
    )
    summary = run_simulation(data, config, Settings()).summary
    assert summary["simulated"] is True and summary["annotator"]["kind"] == "simulated"
    assert [a["name"] for a in summary["arms"]] == ["default/focal", "random/focal"]
    for arm in summary["arms"]:
        assert [r["labels"] for r in arm["rounds"]] == [20, 30, 40]
        for round_ in arm["rounds"]:
            for metric in ("minority_f1", "minority_recall", "macro_f1", "ece"):
                low, high = round_[metric]["ci95"]
                assert low <= round_[metric]["mean"] <= high
        assert arm["stop_reasons"] == ["rounds", "rounds"]
    assert len(summary["full_pool_minority_f1"]["per_seed"]) == 2
    results = write_results(summary, tmp_path)
    assert json.loads(results.read_text())["minority_class"] == 3
    plot = plot_learning_curves(summary, tmp_path)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_and_plateau_stop_the_loop(digits: Digits) -> None:
    data = Dataset(digits.features[:400], digits.labels[:400])
    config = SimulationConfig(
        arms=(Arm("least_confidence", "ce"),),
        seeds=1,
        rounds=10,
        batch=10,
        init=60,
        budget=85,
        rare_class=3,
        workers=1,
    )
    (run_budget,) = run_simulation(data, config, Settings()).runs
    assert [r.labels for r in run_budget.rounds] == [60, 70, 80, 85]
    assert run_budget.stop_reason == "budget"
    # The plateau rule reads validation minority F1, which exists from 500 labels on
    # (100 held-out items at 20%); below that it has nothing to judge and never fires.
    many = Dataset(digits.features, digits.labels)
    plateau = replace(config, rounds=30, init=520, budget=None, plateau_rounds=1)
    (run_plateau,) = run_simulation(many, plateau, Settings()).runs
    assert all(r.val_minority_f1 is not None for r in run_plateau.rounds)
    assert run_plateau.stop_reason == "plateau" and len(run_plateau.rounds) < 31


def test_demo_data_is_digits_with_eights_at_two_percent() -> None:
    data = digits_with_rare_class()
    assert len(data.labels) == 1656 and int((data.labels == 8).sum()) == 33
    assert data.items.shape == (1656, 8, 8) and 0.0 <= data.items.min() <= data.items.max() <= 1.0


def test_without_a_full_pool_reference_labels_to_target_is_absent(
    tmp_path: Path, digits: Digits
) -> None:
    data = Dataset(digits.features[:300], digits.labels[:300])
    config = SimulationConfig(
        arms=(Arm("least_confidence", "ce"),),
        seeds=1,
        rounds=1,
        batch=10,
        init=20,
        rare_class=3,
        workers=1,
        full_pool_reference=False,
    )
    summary = run_simulation(data, config, Settings()).summary
    assert summary["full_pool_minority_f1"] is None
    assert summary["arms"][0]["labels_to_target"] is None
    assert summary["arms"][0]["auc_labels"] == [20, 30]
    assert plot_learning_curves(summary, tmp_path).exists()


def test_the_same_seeds_give_the_same_figures(digits: Digits) -> None:
    """The demo's table is reproducible on one machine and package set: two runs of a short
    simulation (the product's cycle, torch and scikit-learn included) agree to the last digit."""
    data = Dataset(digits.features[:400], digits.labels[:400])
    config = SimulationConfig(
        arms=(Arm("default", "focal"),),
        seeds=1,
        rounds=2,
        batch=10,
        init=20,
        rare_class=3,
        workers=1,
        full_pool_reference=False,
    )
    first, second = (run_simulation(data, config, Settings()) for _ in range(2))
    assert [r.rounds for r in first.runs] == [r.rounds for r in second.runs]
    assert first.summary["arms"] == second.summary["arms"]
