"""The promotion gate's decision on two models' evaluation reports (pure)."""

import numpy as np
import pytest

from services.errors import InvalidInput
from services.evaluation_set import eval_target_size
from services.gate import INSUFFICIENT, GateConfig, decide
from services.ml.metrics import EvaluationReport, evaluate
from services.models import Promotion

LABELS = ["other", "eight"]
TRUTH = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])


def report(predicted: list[int]) -> EvaluationReport:
    """A report for hard predictions `predicted` [10] against TRUTH."""
    probs = np.full((len(predicted), 2), 0.1, dtype=np.float64)
    probs[np.arange(len(predicted)), predicted] = 0.9
    return evaluate(probs, TRUTH, minority_class=1)


PERFECT = report([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
MISSES_ONE_EIGHT = report([0, 0, 0, 0, 0, 0, 1, 1, 1, 0])  # eight recall 1.0 -> 0.75
ONE_FALSE_ALARM = report([1, 0, 0, 0, 0, 0, 1, 1, 1, 1])  # other recall 1.0 -> 0.833


def gate(**values: float) -> GateConfig:
    return GateConfig.from_dict(dict(values), LABELS)


def test_a_recall_drop_beyond_the_tolerance_is_rejected_with_the_class_named() -> None:
    decision = decide(
        labels=LABELS,
        per_class_counts=[6, 4],
        candidate=MISSES_ONE_EIGHT,
        current=PERFECT,
        config=gate(recall_tolerance=0.2, min_labels_per_class=2),
        has_current=True,
    )
    assert decision.promotion == Promotion.REJECTED
    assert decision.reason == (
        "rejected: recall dropped by more than 0.200 (eight recall 1.000 -> 0.750)"
    )


def test_within_the_tolerance_a_macro_f1_drop_still_rejects() -> None:
    decision = decide(
        labels=LABELS,
        per_class_counts=[6, 4],
        candidate=ONE_FALSE_ALARM,
        current=PERFECT,
        config=gate(recall_tolerance=0.2, min_labels_per_class=2),
        has_current=True,
    )
    assert decision.promotion == Promotion.REJECTED
    assert decision.reason.startswith("rejected: macro-F1 dropped 1.000 -> 0.")


def test_an_equal_or_better_model_is_promoted_with_the_comparison() -> None:
    decision = decide(
        labels=LABELS,
        per_class_counts=[6, 4],
        candidate=PERFECT,
        current=MISSES_ONE_EIGHT,
        config=gate(min_labels_per_class=2),
        has_current=True,
    )
    assert decision.promotion == Promotion.CURRENT
    assert decision.reason.startswith("promoted: macro-F1 0.")
    assert "-> 1.000" in decision.reason


def test_too_few_labels_promote_explicitly_without_evaluation() -> None:
    decision = decide(
        labels=LABELS,
        per_class_counts=[6, 4],
        candidate=MISSES_ONE_EIGHT,
        current=PERFECT,
        config=gate(min_labels_per_class=5),
        has_current=True,
    )
    assert decision == decision.__class__(
        Promotion.CURRENT, f"{INSUFFICIENT} (evaluation labels: eight 4/5)"
    )
    nothing = decide(
        labels=LABELS,
        per_class_counts=[0, 0],
        candidate=None,
        current=None,
        config=gate(min_labels_per_class=1),
        has_current=False,
    )
    assert nothing.reason == f"{INSUFFICIENT} (evaluation labels: other 0/1, eight 0/1)"


def test_the_first_model_and_a_grown_label_set_are_promoted_saying_why() -> None:
    config = gate(min_labels_per_class=2)
    first = decide(
        labels=LABELS,
        per_class_counts=[6, 4],
        candidate=PERFECT,
        current=None,
        config=config,
        has_current=False,
    )
    assert first.reason == "promoted: first model (evaluation macro-F1 1.000)"
    grown = decide(
        labels=LABELS,
        per_class_counts=[6, 4],
        candidate=PERFECT,
        current=None,
        config=config,
        has_current=True,
    )
    assert grown.promotion == Promotion.CURRENT
    assert "another label set" in grown.reason


def test_the_evaluation_set_size_follows_the_fraction_and_the_cap() -> None:
    assert eval_target_size(GateConfig(), 600) == 30
    assert eval_target_size(GateConfig(), 1_000_000) == 2000
    assert eval_target_size(GateConfig(eval_fraction=0.0), 600) == 0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"eval_fraction": 0.9}, "eval_fraction must be in [0, 0.5]"),
        ({"recall_tolerance": -0.1}, "recall_tolerance must be in [0, 1]"),
        ({"eval_batch_share": 0.0}, "eval_batch_share must be in (0, 1]"),
        ({"min_labels_per_class": 0}, "min_labels_per_class must be a whole number in [1, "),
        ({"recall_targets": {"nine": 0.9}}, "recall target for unknown class 'nine'"),
        ({"recall_targets": {"eight": 1.5}}, "recall target of 'eight' must be in [0, 1]"),
        ({"tolerance": 0.1}, "unknown gate settings ['tolerance']"),
    ],
)
def test_bad_gate_settings_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("(", r"\(")):
        GateConfig.from_dict(values, LABELS)
