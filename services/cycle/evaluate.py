"""Judging a newly trained model: its metrics (training curve, validation split, evaluation
set, and the current model's evaluation for comparison) and the gate's decision."""

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.artifacts import Scorer, predict
from services.config import Settings
from services.evaluation_set import EvalLabels
from services.gate import Decision, Evidence, GateConfig, decide
from services.ml.checkpoint import Checkpoint
from services.ml.metrics import EvaluationReport, default_minority_class, evaluate
from services.ml.train import TrainResult
from services.recipe import scalar_gamma


@dataclass(frozen=True)
class Judged:
    """A new model's metrics (JSON-friendly, stored on its ModelVersion) and the decision."""

    metrics: dict[str, Any]
    decision: Decision


@dataclass(frozen=True)
class EvaluationSet:
    """The labeled evaluation items neither model trained on: their ids and labels, and their
    inputs [n, *shape] (None when there are none)."""

    labels: EvalLabels
    items: NDArray[np.float32] | None


@dataclass(frozen=True)
class _Judge:
    """Reports on one footing: the training set's minority class, the loss's gamma, and the
    process's device."""

    minority: int
    gamma: float
    settings: Settings

    def report(self, probs: NDArray[np.float32], truth: list[int]) -> EvaluationReport:
        """Metrics of probabilities [n, C] for items whose labels are `truth` [n]."""
        return evaluate(
            probs,
            np.asarray(truth, dtype=np.int64),
            minority_class=self.minority,
            focal_gamma=self.gamma,
        )

    def probs(self, scorer: Scorer, inputs: NDArray[np.float32]) -> NDArray[np.float32]:
        """`scorer`'s probabilities [n, C] for items [n, *shape]."""
        return predict(scorer, inputs, self.settings).probs


def judge(
    *,
    labels: list[str],
    result: TrainResult,
    training: tuple[NDArray[np.float32], NDArray[np.int64]],
    evaluation: EvaluationSet,
    current: Checkpoint | None,
    has_current: bool,
    gate: GateConfig,
    settings: Settings,
) -> Judged:
    """Metrics of the new model `result` and the gate's decision against `current` (the
    current model when it can score this label set; `has_current` says whether one exists).

    training: the items [m, *shape] and labels [m] it was trained on (the validation split is a
    subset). The minority class is the training set's least frequent one, for every report.
    """
    items, targets = training
    n_classes = len(labels)
    judged_by = _Judge(
        minority=default_minority_class(targets, n_classes),
        gamma=scalar_gamma(result.loss),
        settings=settings,
    )
    validation = None
    if len(result.val_indices):
        validation = judged_by.report(
            judged_by.probs(result, items[result.val_indices]),
            targets[result.val_indices].tolist(),
        )
    truth = np.asarray(evaluation.labels.labels, dtype=np.int64)
    candidate = old = None
    # Predictions [n] on the held items (none held: empty); None = no comparable current model.
    candidate_predicted = np.empty(0, dtype=np.int64)
    current_predicted = None if current is None else np.empty(0, dtype=np.int64)
    if evaluation.items is not None:
        candidate_probs = judged_by.probs(result, evaluation.items)
        candidate = judged_by.report(candidate_probs, evaluation.labels.labels)
        candidate_predicted = candidate_probs.argmax(axis=1)
        if current is not None:
            current_probs = judged_by.probs(current, evaluation.items)
            old = judged_by.report(current_probs, evaluation.labels.labels)
            current_predicted = current_probs.argmax(axis=1)
    decision = decide(
        labels=labels,
        evidence=Evidence(
            truth=truth,
            candidate=candidate_predicted,
            current=current_predicted,
            fit_truth=targets,
            fit_predicted=judged_by.probs(result, items).argmax(axis=1),
        ),
        config=gate,
        has_current=has_current,
    )
    per_class = evaluation.labels.per_class(n_classes)
    metrics = _metrics(labels, result, per_class, validation, candidate, old)
    return Judged(metrics, decision)


def _metrics(
    labels: list[str],
    result: TrainResult,
    evaluation_labels: list[int],
    validation: EvaluationReport | None,
    candidate: EvaluationReport | None,
    current: EvaluationReport | None,
) -> dict[str, Any]:
    """What a ModelVersion stores about its model (JSON-friendly)."""
    return {
        "labels": labels,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "val_error": result.val_error,
        "best_epoch": result.best_epoch,
        "temperature": result.temperature,
        "ece_before": result.ece_before,
        "ece_after": result.ece_after,
        "class_counts": dict(zip(labels, result.class_counts, strict=True)),
        "trained_items": len(result.train_indices),
        "validation_items": len(result.val_indices),
        "validation": validation.to_dict() if validation is not None else None,
        "evaluation": candidate.to_dict() if candidate is not None else None,
        "evaluation_of_current": current.to_dict() if current is not None else None,
        "evaluation_labels": dict(zip(labels, evaluation_labels, strict=True)),
    }
