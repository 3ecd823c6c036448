"""The promotion gate's decisions on the evidence it is given (pure), with expected outcomes."""

import numpy as np
import pytest

from services.errors import InvalidInput
from services.evaluation_set import eval_target_size
from services.gate import INSUFFICIENT, Decision, Evidence, GateConfig, decide
from services.gate_evidence import Labels, best_constant, macro_f1
from services.models import Promotion

LABELS = ["zero", "one", "two", "eight"]


def labels(*runs: tuple[int, int]) -> Labels:
    """(class, count) runs -> labels [n]."""
    return np.concatenate([np.full(count, label, dtype=np.int64) for label, count in runs])


# 60 evaluation items: 20 zeros, 20 ones, 16 twos, 4 eights (the rare class).
TRUTH = labels((0, 20), (1, 20), (2, 16), (3, 4))
FIT_TRUTH = labels((0, 30), (1, 30), (2, 30), (3, 6))


def judge(
    candidate: Labels,
    current: Labels | None,
    *,
    truth: Labels = TRUTH,
    fit_predicted: Labels | None = None,
    has_current: bool = True,
    **config: float,
) -> Decision:
    return decide(
        labels=LABELS,
        evidence=Evidence(
            truth=truth,
            candidate=candidate,
            current=current,
            fit_truth=FIT_TRUTH,
            fit_predicted=FIT_TRUTH if fit_predicted is None else fit_predicted,
        ),
        config=GateConfig.from_dict(dict(config), LABELS),
        has_current=has_current,
    )


def miss(truth: Labels, *errors: tuple[int, int, int]) -> Labels:
    """Predictions: `truth` except, for each (label, count, as_label), the first `count` items
    of `label` predicted as `as_label`."""
    predicted = truth.copy()
    for label, count, as_label in errors:
        predicted[np.flatnonzero(truth == label)[:count]] = as_label
    return predicted


def test_a_collapsed_model_is_rejected_naming_the_class_it_always_predicts() -> None:
    constant = np.full(len(FIT_TRUTH), 2, dtype=np.int64)
    decision = judge(np.full(len(TRUTH), 2, dtype=np.int64), TRUTH, fit_predicted=constant)
    assert decision == Decision(
        Promotion.REJECTED,
        "rejected: collapsed: predicts 'two' for every one of its 96 training items (4 classes)",
    )
    # Also as the first model, and with no evaluation item at all.
    empty = np.empty(0, dtype=np.int64)
    first = judge(empty, None, truth=empty, fit_predicted=constant, has_current=False)
    assert first.promotion == Promotion.REJECTED
    assert first.reason.startswith("rejected: collapsed: predicts 'two'")


def test_a_tiny_evaluation_set_refuses_a_collapse_and_otherwise_says_evidence_is_thin() -> None:
    tiny = labels((0, 2), (1, 2), (3, 1))
    collapsed = judge(
        np.zeros(5, dtype=np.int64),
        tiny,
        truth=tiny,
        fit_predicted=np.zeros(len(FIT_TRUTH), dtype=np.int64),
    )
    assert collapsed.promotion == Promotion.REJECTED
    assert "collapsed" in collapsed.reason
    # A poor but working model on five items: nothing can be concluded, and the gate says so.
    worse = judge(miss(tiny, (0, 2, 1)), tiny, truth=tiny)
    assert worse == Decision(
        Promotion.CURRENT,
        f"{INSUFFICIENT} (5 evaluation items neither model trained on; a comparison needs 10 "
        "of two classes or more); not collapsed",
    )


def test_a_model_no_better_than_a_constant_predictor_is_rejected() -> None:
    # It predicts two classes on training items (not collapsed) but says "one" for every
    # evaluation item: the best constant predictor scores as well.
    constant_class, baseline = best_constant(TRUTH, len(LABELS))
    decision = judge(np.full(len(TRUTH), 1, dtype=np.int64), TRUTH)
    assert decision.promotion == Promotion.REJECTED
    assert decision.reason.startswith("rejected: no better than a constant predictor: ")
    assert f"<= {baseline:.3f} of predicting {LABELS[constant_class]!r}" in decision.reason


def test_a_model_worse_on_one_common_class_only_is_rejected_naming_that_class() -> None:
    # 8 of the 20 ones become zeros; every other class as good as the current model.
    decision = judge(miss(TRUTH, (1, 8, 0)), TRUTH, recall_tolerance=0.05)
    assert decision.promotion == Promotion.REJECTED
    assert decision.reason.startswith(
        "rejected: recall dropped by more than 0.050 (one recall 1.000 -> 0.600 on 20 items, p="
    )
    assert "zero recall" not in decision.reason and "eight recall" not in decision.reason


def test_a_rare_class_drop_on_two_items_is_not_evident_and_is_named_as_such() -> None:
    # One of four eights missed: beyond the tolerance, but one item proves nothing.
    decision = judge(miss(TRUTH, (3, 1, 2)), TRUTH)
    assert decision.promotion == Promotion.CURRENT
    assert "not evident: eight recall 1.000 -> 0.750 on 4 items" in decision.reason


def test_an_evident_macro_f1_drop_beyond_its_tolerance_is_rejected() -> None:
    # Small losses in every class (none beyond the 0.6 recall tolerance) add up.
    candidate = miss(TRUTH, (0, 4, 1), (1, 4, 2), (2, 4, 0), (3, 2, 0))
    decision = judge(candidate, TRUTH, recall_tolerance=0.6, macro_f1_tolerance=0.05)
    assert decision.promotion == Promotion.REJECTED
    assert decision.reason.startswith("rejected: macro-F1 dropped 1.000 -> 0.")
    assert "bootstrap resamples of 60 evaluation items" in decision.reason
    # The same model with a looser macro-F1 tolerance passes.
    looser = judge(candidate, TRUTH, recall_tolerance=0.6, macro_f1_tolerance=0.5)
    assert looser.promotion == Promotion.CURRENT


def test_an_equal_or_better_model_is_promoted_with_the_comparison() -> None:
    decision = judge(TRUTH, miss(TRUTH, (1, 3, 0)))
    assert decision.promotion == Promotion.CURRENT
    assert decision.reason.startswith("promoted: macro-F1 0.")
    assert "-> 1.000 on 60 evaluation items" in decision.reason


def test_the_first_model_and_a_grown_label_set_are_promoted_saying_why() -> None:
    first = judge(TRUTH, None, has_current=False)
    assert first.reason == "promoted: first model (evaluation macro-F1 1.000)"
    grown = judge(TRUTH, None)
    assert grown.promotion == Promotion.CURRENT
    assert "another label set" in grown.reason


def test_macro_f1_ignores_classes_absent_from_both_sides() -> None:
    truth = labels((0, 3), (1, 3))
    assert macro_f1(truth, truth, 10) == 1.0
    assert macro_f1(truth, labels((0, 6)), 10) == pytest.approx((2 * 3 / 9 + 0) / 2)


def test_the_evaluation_set_size_follows_the_fraction_and_the_cap() -> None:
    assert eval_target_size(GateConfig(), 600) == 30
    assert eval_target_size(GateConfig(), 1_000_000) == 2000
    assert eval_target_size(GateConfig(eval_fraction=0.0), 600) == 0


def test_a_setting_older_versions_stored_is_accepted_and_dropped() -> None:
    assert GateConfig.from_dict({"min_labels_per_class": 5}, LABELS) == GateConfig()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"eval_fraction": 0.9}, "eval_fraction must be in [0, 0.5]"),
        ({"recall_tolerance": -0.1}, "recall_tolerance must be in [0, 1]"),
        ({"macro_f1_tolerance": 2}, "macro_f1_tolerance must be in [0, 1]"),
        ({"macro_f1_tolerance": "x"}, "macro_f1_tolerance must be a number"),
        ({"eval_batch_share": 0.0}, "eval_batch_share must be in (0, 1]"),
        ({"eval_rounds": 0}, "eval_rounds must be a whole number in [1, 1000] or null"),
        ({"alert_after_rejections": 0}, "alert_after_rejections must be a whole number in [1, "),
        ({"recall_targets": {"nine": 0.9}}, "recall target for unknown class 'nine'"),
        ({"recall_targets": {"eight": 1.5}}, "recall target of 'eight' must be in [0, 1]"),
        ({"tolerance": 0.1}, "unknown gate settings ['tolerance']"),
    ],
)
def test_bad_gate_settings_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("(", r"\(")):
        GateConfig.from_dict(values, LABELS)
