"""The console's pure parts: intervals, the reliability diagram, the live cycle's stage and ETA,
the SVG charts, the terminal's status line, and the alert rules held to infra's rules file."""

import io
import math
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from scipy.stats import binomtest

from services.alerts import ALERT_RULES
from services.api.console.charts import Point, Series, line_chart
from services.api.console.history import wilson
from services.commands.live_status import LiveStatus
from services.ml.metrics import ECE_BINS, expected_calibration_error, reliability_bins
from services.models import Cycle, CycleState
from services.overview import Glance, live_cycle, status_line
from services.status import is_imbalanced, supported_recalls
from tests.unit.test_observability_config import load_yaml

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("k", "n"), [(0, 5), (3, 7), (7, 7), (1, 1), (40, 100), (999, 1000)])
def test_wilson_intervals_match_scipys(k: int, n: int) -> None:
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson(k, n) or (math.nan, math.nan)
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0
    assert wilson(0, 0) is None


def test_the_reliability_diagram_is_the_ece_it_explains() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(500, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    targets = rng.integers(0, 4, size=500)
    bins = reliability_bins(probs, targets)
    assert sum(b["count"] for b in bins) == 500 and len(bins) <= ECE_BINS
    assert all(b["low"] < b["confidence"] <= b["high"] for b in bins)
    gap = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / 500
    assert gap == pytest.approx(expected_calibration_error(probs, targets), abs=1e-6)


def _cycle(state: CycleState, **fields: Any) -> Cycle:
    timeline = [{"state": "pending", "at": T0.isoformat()}, {"state": state, "at": T0.isoformat()}]
    return Cycle(
        id=9, project_id=1, number=4, state=state, trigger="test", timeline=timeline,
        updated_at=T0, **fields,
    )  # fmt: skip


def test_the_live_cycle_says_where_it_is_and_how_long_is_left() -> None:
    training = live_cycle(
        _cycle(
            CycleState.TRAINING,
            progress={
                "epoch": 10,
                "epochs": 100,
                "train_loss": 0.25,
                "val_loss": None,
                "started_at": T0.isoformat(),
                "at": (T0 + timedelta(seconds=5)).isoformat(),
            },
        )
    )
    assert training.stage == "training: epoch 10 of at most 100, loss 0.2500"
    assert training.eta_s == pytest.approx(45.0)  # 0.5 s an epoch, 90 left (at most)
    scoring = live_cycle(
        _cycle(CycleState.SCORING, chunks_total=8, chunks_done=2),
        now=T0 + timedelta(seconds=10),
    )
    assert scoring.stage == "scoring: 2 of 8 chunks"
    assert scoring.eta_s == pytest.approx(30.0)
    # Progress left over from training is not shown once the cycle moved on.
    done = live_cycle(_cycle(CycleState.DONE, selected_count=20, progress={"epoch": 3}))
    assert (done.stage, done.epoch, done.eta_s, done.active) == (
        "done: 20 items handed off", None, None, False,
    )  # fmt: skip
    assert live_cycle(_cycle(CycleState.TRAINING)).stage == "training: starting"


def test_line_charts_draw_every_point_and_escape_every_name() -> None:
    svg = str(
        line_chart(
            [
                Series("<b>", [Point(1, 0.5, 0.4, 0.6, version=1), Point(3, 0.7, version=2)]),
                Series("x", [Point(2, 0.2, on_line=False, kind="no-report", title="a & b")]),
            ],
            name="test",
            title="t",
            x_label="labels",
            y_label="y",
        )
    )
    assert len(re.findall(r"<circle ", svg)) == 3
    assert svg.count('class="whiskers"') == 1 and "V" in svg.split('class="whiskers" d="')[1]
    assert svg.count("<polyline") == 1  # the single off-line point draws no line
    assert "<b>" not in svg and "&lt;b&gt;" in svg and "a &amp; b" in svg
    assert re.findall(r'data-version="(\d)"', svg) == ["1", "2"]


def test_a_balanced_project_has_no_minority_and_unmeasured_classes_no_recall() -> None:
    assert not is_imbalanced({"a": 50, "b": 40, "c": 30})
    assert is_imbalanced({"a": 50, "b": 24})
    assert not is_imbalanced({"a": 5}) and not is_imbalanced(None)
    metrics = {
        "labels": ["a", "b", "c"],
        "evaluation": {
            "per_class": [
                {"label": 0, "recall": 0.9, "support": 10},
                {"label": 1, "recall": 0.0, "support": 0},
                {"label": 2, "recall": 0.5, "support": 2},
            ]
        },
    }
    assert supported_recalls(metrics, ["a", "b", "c"]) == {"a": 0.9, "c": 0.5}


def test_the_status_line_and_its_printer_off_a_terminal() -> None:
    glance = Glance(
        name="digits", paused=False, cycle=live_cycle(_cycle(CycleState.SCORING, chunks_total=4)),
        labels_used=120, label_budget=None, open_tasks=7, current_model=3,
        current_macro_f1=0.91234, newest_model=3, gate_decision="current", gate_reason=None,
        alerts=[],
    )  # fmt: skip
    line = status_line(glance)
    assert line == "digits · cycle #4 scoring: 0 of 4 chunks · m3 macro-F1 0.912 · 7 open tasks"
    output = io.StringIO()
    lines = iter([["a 1"], ["a 1"], ["a 2"]])
    printer = LiveStatus(Console(file=output, force_terminal=False), lambda: next(lines, ["a 2"]),
                         interval_s=0.01)  # fmt: skip
    printer.start()
    for _ in range(200):
        if "a 2" in output.getvalue():
            break
        time.sleep(0.01)
    printer.stop()
    assert output.getvalue().splitlines() == ["a 1", "a 2"]  # a line again only when it changed


def test_every_rule_in_the_alerts_file_is_evaluated_by_focalloop() -> None:
    rules = load_yaml("infra/prometheus/alerts.yml")["groups"][0]["rules"]
    assert {rule["alert"]: rule["labels"]["severity"] for rule in rules} == {
        name: severity for name, (severity, _) in ALERT_RULES.items()
    }
