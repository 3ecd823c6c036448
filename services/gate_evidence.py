"""The statistics the promotion gate decides with: macro-F1 on hard predictions, the best
constant predictor's macro-F1, a per-class test of a recall drop on paired predictions, and a
paired bootstrap of a macro-F1 drop. Pure numpy/scipy: labels in, numbers out."""

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.stats import binomtest

Labels = NDArray[np.int64]

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # the gate's decision on the same evidence is the same every time


def macro_f1(truth: Labels, predicted: Labels, n_classes: int) -> float:
    """Macro-F1 over the classes present in `truth` or `predicted` (F1 0 where undefined): a
    class absent from both says nothing about either model."""
    return float(_macro_f1_many(truth[None, :], predicted[None, :], n_classes)[0])


def _macro_f1_many(truth: NDArray[Any], predicted: NDArray[Any], n_classes: int) -> NDArray[Any]:
    """Macro-F1 of each row: truth and predicted [r, n] -> [r]."""
    classes = np.arange(n_classes)[None, None, :]
    is_true = truth[:, :, None] == classes  # [r, n, C]
    is_predicted = predicted[:, :, None] == classes
    hits = np.sum(is_true & is_predicted, axis=1).astype(np.float64)  # [r, C]
    true_counts = is_true.sum(axis=1)
    predicted_counts = is_predicted.sum(axis=1)
    denominator = true_counts + predicted_counts
    f1 = np.divide(2 * hits, denominator, out=np.zeros_like(hits), where=denominator > 0)
    present = denominator > 0
    return np.asarray(f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1))


def best_constant(truth: Labels, n_classes: int) -> tuple[int, float]:
    """(class, macro-F1) of the best model that predicts one class for everything."""
    scores = [macro_f1(truth, np.full_like(truth, label), n_classes) for label in range(n_classes)]
    best = int(np.argmax(scores))
    return best, scores[best]


@dataclass(frozen=True)
class RecallChange:
    """One class on the evaluation items: its items, both models' recall, and the one-sided
    p-value (exact binomial on the items only one model gets right) that the candidate's
    recall is lower."""

    label: int
    items: int
    current_recall: float
    candidate_recall: float
    p_value: float

    @property
    def drop(self) -> float:
        return self.current_recall - self.candidate_recall


def recall_changes(
    truth: Labels, candidate: Labels, current: Labels, n_classes: int
) -> list[RecallChange]:
    """Every class with evaluation items: the paired change of its recall."""
    changes = []
    for label in range(n_classes):
        members = truth == label
        count = int(members.sum())
        if count == 0:
            continue
        candidate_right = candidate[members] == label
        current_right = current[members] == label
        lost = int(np.sum(current_right & ~candidate_right))
        gained = int(np.sum(candidate_right & ~current_right))
        p_value = (
            binomtest(lost, lost + gained, 0.5, alternative="greater").pvalue
            if lost + gained
            else 1.0
        )
        changes.append(
            RecallChange(
                label=label,
                items=count,
                current_recall=float(current_right.mean()),
                candidate_recall=float(candidate_right.mean()),
                p_value=float(p_value),
            )
        )
    return changes


def macro_f1_drop_confidence(
    truth: Labels, candidate: Labels, current: Labels, n_classes: int, tolerance: float
) -> float:
    """Share of paired bootstrap resamples of the evaluation items in which the candidate's
    macro-F1 is more than `tolerance` below the current model's."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    rows = rng.integers(0, len(truth), size=(BOOTSTRAP_RESAMPLES, len(truth)))
    beyond = 0
    for start in range(0, BOOTSTRAP_RESAMPLES, 200):  # [200, n, C] at a time bounds the memory
        chunk = rows[start : start + 200]
        drop = _macro_f1_many(truth[chunk], current[chunk], n_classes) - _macro_f1_many(
            truth[chunk], candidate[chunk], n_classes
        )
        beyond += int(np.sum(drop > tolerance))
    return beyond / BOOTSTRAP_RESAMPLES
