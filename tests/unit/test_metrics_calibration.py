import math
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from services.ml.calibration import calibrated_probs, fit_temperature
from services.ml.metrics import evaluate, expected_calibration_error, pool_hard_example_rate

# Six items, three classes; predictions: 0, 0, 1, 1, 2, 0. True: 0, 0, 1, 2, 2, 2.
PROBS = np.array(
    [
        [0.9, 0.05, 0.05],
        [0.6, 0.3, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.5, 0.4],
        [0.1, 0.1, 0.8],
        [0.5, 0.2, 0.3],
    ]
)
TARGETS = np.array([0, 0, 1, 2, 2, 2])


def test_classification_metrics_are_exact() -> None:
    report = evaluate(PROBS, TARGETS, minority_class=1, focal_gamma=0.0, hard_threshold=0.5)
    assert report.n_items == 6 and report.accuracy == pytest.approx(4 / 6)
    assert report.confusion == [[2, 0, 0], [0, 1, 0], [1, 1, 1]]
    by_class = {m.label: m for m in report.per_class}
    assert by_class[0].precision == pytest.approx(2 / 3) and by_class[0].recall == 1.0
    assert by_class[1].precision == pytest.approx(1 / 2) and by_class[1].recall == 1.0
    assert by_class[2].precision == 1.0 and by_class[2].recall == pytest.approx(1 / 3)
    assert [m.support for m in report.per_class] == [2, 1, 3]
    f1 = [0.8, 2 / 3, 0.5]
    assert report.macro_f1 == pytest.approx(sum(f1) / 3)
    assert report.minority_f1 == pytest.approx(2 / 3) and report.minority_recall == 1.0
    # p_t: 0.9, 0.6, 0.7, 0.4, 0.8, 0.3 -> two below 0.5.
    assert report.hard_example_rate == pytest.approx(2 / 6)
    brier = np.mean(((PROBS - np.eye(3)[TARGETS]) ** 2).sum(axis=1))
    assert report.brier == pytest.approx(brier)
    # With gamma = 0 the focal loss is -log p_t: percentiles of those six values.
    nll = -np.log([0.9, 0.6, 0.7, 0.4, 0.8, 0.3])
    assert report.focal_loss_percentiles["p50"] == pytest.approx(np.percentile(nll, 50))
    assert report.focal_loss_percentiles["p99"] == pytest.approx(np.percentile(nll, 99))


def test_default_minority_is_the_least_frequent_present_class() -> None:
    assert evaluate(PROBS, TARGETS).minority_class == 1


def test_ece_matches_a_hand_computed_value() -> None:
    # Top-label confidences 0.9 (right), 0.6 (right), 0.7 (right), 0.5 (wrong), 0.8 (right),
    # 0.5 (wrong); 15 equal-width bins put each confidence in its own bin except the two 0.5s.
    expected = (abs(0.9 - 1) + abs(0.6 - 1) + abs(0.7 - 1) + 2 * abs(0.5 - 0) + abs(0.8 - 1)) / 6
    assert expected_calibration_error(PROBS, TARGETS) == pytest.approx(expected, abs=1e-6)


def test_pool_hard_example_rate_uses_the_top_probability() -> None:
    assert pool_hard_example_rate(PROBS, threshold=0.55) == pytest.approx(2 / 6)
    assert pool_hard_example_rate(PROBS, threshold=0.95) == 1.0


@pytest.mark.parametrize(
    ("probs", "targets", "message"),
    [
        (np.full((2, 3), 0.5), np.array([0, 1]), "sum to 1"),
        (PROBS, TARGETS[:5], "targets must be"),
        (PROBS, np.array([0, 0, 1, 2, 2, 3]), "class indices"),
        (np.empty((0, 3)), np.empty(0, dtype=int), "probs must be"),
    ],
)
def test_invalid_inputs_are_refused(
    probs: NDArray[Any], targets: NDArray[Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(probs, targets)


def test_temperature_fit_recovers_the_true_temperature() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 5, generator=generator) * 4
    # Labels drawn from softmax(logits / 2.5): the logits are overconfident by exactly T = 2.5.
    targets = torch.multinomial(torch.softmax(logits / 2.5, dim=1), 1, generator=generator)[:, 0]
    temperature = fit_temperature(logits, targets)
    assert temperature == pytest.approx(2.5, rel=0.03)
    before = expected_calibration_error(calibrated_probs(logits, 1.0).numpy(), targets.numpy())
    after = expected_calibration_error(
        calibrated_probs(logits, temperature).numpy(), targets.numpy()
    )
    assert after < before / 3
    assert math.isclose(fit_temperature(torch.empty(0, 5), torch.empty(0)), 1.0)
