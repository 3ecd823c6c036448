"""The simulated annotator's answers: exact without noise, wrong at the given rate (always
another class, uniformly), and the same for the same project seed and item."""

import numpy as np
import pytest

from labeling.simulated import check_noise, simulated_answer

LABELS = ["a", "b", "c", "d"]


def test_simulated_annotator_is_exact_without_noise() -> None:
    keys = [f"i{i}" for i in range(200)]
    truths = [LABELS[i % 4] for i in range(200)]
    answers = [
        simulated_answer(truth, LABELS, noise=0.0, seed=3, key=key)
        for truth, key in zip(truths, keys, strict=True)
    ]
    assert answers == truths


def test_simulated_noise_rate_and_wrong_answers_are_other_classes() -> None:
    answers = [simulated_answer("a", LABELS, noise=0.2, seed=3, key=f"i{i}") for i in range(20_000)]
    wrong = [answer for answer in answers if answer != "a"]
    assert abs(len(wrong) / 20_000 - 0.2) < 0.01
    assert set(wrong) == {"b", "c", "d"}
    counts = np.array([wrong.count(label) for label in ("b", "c", "d")])
    assert counts.min() > 0.3 * len(wrong)


def test_answers_are_reproducible_per_seed_and_item() -> None:
    first = [simulated_answer("a", LABELS, noise=0.5, seed=1, key=f"i{i}") for i in range(500)]
    again = [simulated_answer("a", LABELS, noise=0.5, seed=1, key=f"i{i}") for i in range(500)]
    other = [simulated_answer("a", LABELS, noise=0.5, seed=2, key=f"i{i}") for i in range(500)]
    assert first == again and first != other


@pytest.mark.parametrize("noise", [-0.1, 1.0, 2.0])
def test_impossible_noise_rates_are_refused(noise: float) -> None:
    with pytest.raises(ValueError, match="noise"):
        check_noise(noise)
