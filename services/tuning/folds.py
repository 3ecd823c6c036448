"""Repeated stratified k-fold splits of a project's labels, and the metrics a study ranks by.

Stratified so that every held-out fold holds items of every class, the rare one included: a fold
without the rare class has no minority F1 to give. A class with fewer labels than folds cannot
be spread that way, and the study is refused rather than run on folds that silently lack it.
"""

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import f1_score, precision_recall_fscore_support
from sklearn.model_selection import RepeatedStratifiedKFold

from services.errors import InvalidInput


@dataclass(frozen=True)
class Fold:
    """Positions into the labeled rows: train [m_train], held [m_held]; repeat and fold
    number (0-based) name it."""

    repeat: int
    number: int
    train: NDArray[np.int64]
    held: NDArray[np.int64]


def make_folds(
    labels: NDArray[np.int64], *, folds: int, repeats: int, seed: int, class_names: list[str]
) -> list[Fold]:
    """`repeats` x `folds` stratified splits of `labels` [m] (class indices), seeded.

    InvalidInput when folds < 2, repeats < 1, or a class present in the project has fewer
    labels than folds (named, with its count)."""
    if folds < 2:
        raise InvalidInput(f"folds must be at least 2, got {folds}")
    if repeats < 1:
        raise InvalidInput(f"repeats must be at least 1, got {repeats}")
    counts = np.bincount(labels, minlength=len(class_names))
    short = [(class_names[c], int(n)) for c, n in enumerate(counts) if n < folds]
    if short:
        listed = ", ".join(f"{name!r} has {n}" for name, n in short)
        remedy = (
            "label some of each first"
            if any(n == 0 for _, n in short)
            else "label more of them or use fewer folds"
        )
        raise InvalidInput(
            f"every class needs at least {folds} labels for {folds} folds: {listed}; {remedy}"
        )
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    placeholder = np.zeros(len(labels))
    return [
        Fold(
            repeat=index // folds,
            number=index % folds,
            train=train.astype(np.int64),
            held=held.astype(np.int64),
        )
        for index, (train, held) in enumerate(splitter.split(placeholder, labels))
    ]


@dataclass(frozen=True)
class FoldScores:
    """One fold's held-out figures: per-class precision, recall, F1 [C] and macro-F1."""

    precision: list[float]
    recall: list[float]
    f1: list[float]
    macro_f1: float


def fold_scores(
    truth: NDArray[np.int64], predicted: NDArray[np.int64], n_classes: int
) -> FoldScores:
    """scikit-learn's per-class figures over all `n_classes` (a class never predicted scores 0)."""
    classes = list(range(n_classes))
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, labels=classes, zero_division=0.0
    )
    macro = f1_score(truth, predicted, labels=classes, average="macro", zero_division=0.0)
    return FoldScores(
        precision=[float(v) for v in precision],
        recall=[float(v) for v in recall],
        f1=[float(v) for v in f1],
        macro_f1=float(macro),
    )
