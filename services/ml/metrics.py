"""Evaluation metrics for a classifier's probabilities: what the loop reports and gates on.

Built on scikit-learn (per-class scores, confusion matrix, Brier) and torchmetrics (ECE); only
the focal-loss percentiles and hard-example rates, which neither provides, are computed here.
"""

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.metrics import (
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from torchmetrics.functional.classification import multiclass_calibration_error

from services.ml.losses import FocalLoss

ECE_BINS = 15


@dataclass(frozen=True)
class ClassMetrics:
    """One class's scores on held-out data; precision/recall/F1 are 0 where undefined."""

    label: int
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class EvaluationReport:
    """A model's quality on labeled held-out data (all rates are fractions in [0, 1]).

    hard_example_rate: share of items whose true-class probability p_t < hard_threshold.
    focal_loss_percentiles: per-item focal loss (with `focal_gamma`) at p50/p90/p99, in nats.
    confusion: [C, C], rows = true class, columns = predicted class.
    reliability: the top-label reliability diagram behind `ece`: one entry per non-empty
    confidence bin, {low, high, confidence (mean), accuracy, count}.
    """

    n_items: int
    accuracy: float
    macro_f1: float
    minority_class: int
    minority_f1: float
    minority_recall: float
    ece: float
    brier: float
    hard_threshold: float
    hard_example_rate: float
    focal_gamma: float
    focal_loss_percentiles: dict[str, float]
    per_class: list[ClassMetrics]
    confusion: list[list[int]]
    reliability: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_probs(
    probs: NDArray[np.floating[Any]], targets: NDArray[np.integer[Any]] | None
) -> None:
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise ValueError(f"probs must be [n >= 1, C >= 2], got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("every row of probs must be finite and sum to 1")
    if targets is not None:
        if targets.shape != (probs.shape[0],):
            raise ValueError(f"targets must be [{probs.shape[0]}], got shape {targets.shape}")
        if targets.min() < 0 or targets.max() >= probs.shape[1]:
            raise ValueError(f"targets must be class indices in [0, {probs.shape[1]})")


def expected_calibration_error(
    probs: NDArray[np.floating[Any]], targets: NDArray[np.integer[Any]], *, n_bins: int = ECE_BINS
) -> float:
    """Top-label ECE with `n_bins` equal-width confidence bins (L1, weighted by bin size)."""
    _check_probs(probs, targets)
    return float(
        multiclass_calibration_error(
            torch.as_tensor(probs, dtype=torch.float32),
            torch.as_tensor(targets, dtype=torch.long),
            num_classes=probs.shape[1],
            n_bins=n_bins,
            norm="l1",
        )
    )


def reliability_bins(
    probs: NDArray[np.floating[Any]], targets: NDArray[np.integer[Any]], *, n_bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """The reliability diagram of `probs` [n, C] against `targets` [n]: top-label confidence in
    `n_bins` equal-width bins (the binning of `expected_calibration_error`), empty bins left out."""
    _check_probs(probs, targets)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bins are (low, high], as torchmetrics bins them; the first also takes exactly 0.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        members = index == b
        if members.any():
            bins.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "confidence": float(confidence[members].mean()),
                    "accuracy": float(correct[members].mean()),
                    "count": int(members.sum()),
                }
            )
    return bins


def pool_hard_example_rate(probs: NDArray[np.floating[Any]], *, threshold: float = 0.5) -> float:
    """On unlabeled items: the share whose highest class probability is below `threshold`."""
    _check_probs(probs, None)
    return float(np.mean(probs.max(axis=1) < threshold))


def default_minority_class(targets: NDArray[np.integer[Any]], n_classes: int) -> int:
    """The least frequent class among those present in `targets` (lowest index on ties)."""
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    counts[counts == 0] = np.inf
    return int(np.argmin(counts))


def evaluate(
    probs: NDArray[np.floating[Any]],
    targets: NDArray[np.integer[Any]],
    *,
    minority_class: int | None = None,
    focal_gamma: float = 2.0,
    hard_threshold: float = 0.5,
) -> EvaluationReport:
    """Score predictions `probs` [n, C] (rows sum to 1) against true labels `targets` [n].

    minority_class: the class whose F1/recall the loop optimizes; default: the least frequent
    class present in `targets`.
    """
    _check_probs(probs, targets)
    n_classes = probs.shape[1]
    if minority_class is None:
        minority_class = default_minority_class(targets, n_classes)
    if not 0 <= minority_class < n_classes:
        raise ValueError(f"minority_class {minority_class} is not in [0, {n_classes})")
    labels = list(range(n_classes))
    predictions = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predictions, labels=labels, zero_division=0
    )
    per_class = [
        ClassMetrics(
            label=c,
            precision=float(precision[c]),
            recall=float(recall[c]),
            f1=float(f1[c]),
            support=int(support[c]),
        )
        for c in labels
    ]
    log_probs = torch.log(torch.as_tensor(probs, dtype=torch.float64).clamp_min(1e-300))
    focal = FocalLoss(gamma=focal_gamma, reduction="none")(
        log_probs, torch.as_tensor(targets, dtype=torch.long)
    ).numpy()
    p50, p90, p99 = np.percentile(focal, [50, 90, 99])
    p_true = probs[np.arange(len(targets)), targets]
    return EvaluationReport(
        n_items=len(targets),
        accuracy=float(np.mean(predictions == targets)),
        macro_f1=float(
            f1_score(targets, predictions, labels=labels, average="macro", zero_division=0)
        ),
        minority_class=minority_class,
        minority_f1=per_class[minority_class].f1,
        minority_recall=per_class[minority_class].recall,
        ece=expected_calibration_error(probs, targets),
        brier=float(brier_score_loss(targets, probs, labels=labels)),
        hard_threshold=hard_threshold,
        hard_example_rate=float(np.mean(p_true < hard_threshold)),
        focal_gamma=focal_gamma,
        focal_loss_percentiles={"p50": float(p50), "p90": float(p90), "p99": float(p99)},
        per_class=per_class,
        confusion=confusion_matrix(targets, predictions, labels=labels).tolist(),
        reliability=reliability_bins(probs, targets),
    )
