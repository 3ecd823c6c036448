"""A project's models over time: the learning curve (labels on x; macro-F1 and each class's
recall and precision, with 95% Wilson intervals from the counts behind them), promotion
decisions, hard-example rate, focal-loss percentiles and calibration per model version.

Wilson intervals are computed here in closed form: scipy's `binomtest(...).proportion_ci` gives
the same numbers but costs about 0.1 ms a call, and a project with 200 models of 10 classes
needs 4,000 of them per page.
"""

import math
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, col, select

from services.models import DatasetVersion, ModelVersion, Project
from services.status import headline_report, is_imbalanced

Z95 = 1.959963984540054


def wilson(successes: int, trials: int) -> tuple[float, float] | None:
    """The 95% Wilson score interval of successes/trials (None without trials)."""
    if trials <= 0:
        return None
    p = successes / trials
    denominator = 1 + Z95**2 / trials
    centre = (p + Z95**2 / (2 * trials)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / trials + Z95**2 / (4 * trials**2)) / denominator
    # At p = 0 or 1 the bound is exactly 0 or 1; the arithmetic above misses it by an ulp.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class ClassPoint:
    """One class in one model's report: recall over its `support` true items, precision over
    the `predicted` items the model put in it; intervals None where there were none."""

    label: str
    support: int
    predicted: int
    recall: float | None
    recall_interval: tuple[float, float] | None
    precision: float | None
    precision_interval: tuple[float, float] | None


@dataclass(frozen=True)
class ModelPoint:
    """One model version on the learning curve.

    labels: labeled items in the dataset version it trained on. Rates are fractions in [0, 1];
    focal-loss percentiles in nats; reliability: [{low, high, confidence, accuracy, count}].
    """

    version: int
    dataset_version: int
    labels: int
    promotion: str
    reason: str | None
    evaluated_on: str | None
    n_items: int | None
    macro_f1: float | None
    minority: str | None
    classes: list[ClassPoint] = field(default_factory=list)
    hard_example_rate: float | None = None
    focal_loss_percentiles: dict[str, float] = field(default_factory=dict)
    ece: float | None = None
    ece_before: float | None = None
    ece_after: float | None = None
    temperature: float | None = None
    reliability: list[dict[str, float]] = field(default_factory=list)


def _classes(report: dict[str, Any], names: list[str]) -> list[ClassPoint]:
    confusion = report.get("confusion") or []
    predicted = [sum(column) for column in zip(*confusion, strict=True)] if confusion else []
    points = []
    for row in report["per_class"]:
        c = int(row["label"])
        hits = int(confusion[c][c]) if confusion else round(row["recall"] * row["support"])
        support = int(row["support"])
        made = int(predicted[c]) if predicted else 0
        points.append(
            ClassPoint(
                label=names[c],
                support=support,
                predicted=made,
                recall=float(row["recall"]) if support else None,
                recall_interval=wilson(hits, support),
                precision=float(row["precision"]) if made else None,
                precision_interval=wilson(hits, made),
            )
        )
    return points


def model_point(model: ModelVersion, labels: int, class_names: list[str]) -> ModelPoint:
    metrics = dict(model.metrics)
    names = list(metrics.get("labels") or class_names)
    which, report = headline_report(metrics)
    base = ModelPoint(
        version=model.version,
        dataset_version=model.dataset_version,
        labels=labels,
        promotion=model.promotion,
        reason=model.promotion_reason,
        evaluated_on=which,
        n_items=None,
        macro_f1=None,
        minority=None,
        ece_before=metrics.get("ece_before"),
        ece_after=metrics.get("ece_after"),
        temperature=metrics.get("temperature"),
    )
    if report is None:
        return base
    skewed = is_imbalanced(metrics.get("class_counts"))
    return ModelPoint(
        **{
            **base.__dict__,
            "n_items": int(report["n_items"]),
            "macro_f1": float(report["macro_f1"]),
            "minority": names[report["minority_class"]] if skewed else None,
            "classes": _classes(report, names),
            "hard_example_rate": float(report["hard_example_rate"]),
            "focal_loss_percentiles": dict(report.get("focal_loss_percentiles") or {}),
            "ece": float(report["ece"]),
            "reliability": list(report.get("reliability") or []),
        }
    )


def learning_curve(session: Session, project: Project) -> list[ModelPoint]:
    """Every model version of the project, oldest first."""
    rows = {
        version: rows or 0
        for version, rows in session.exec(
            select(DatasetVersion.version, DatasetVersion.row_count).where(
                DatasetVersion.project_id == project.id
            )
        )
    }
    models = session.exec(
        select(ModelVersion)
        .where(ModelVersion.project_id == project.id)
        .order_by(col(ModelVersion.version))
    )
    return [
        model_point(model, rows.get(model.dataset_version, 0), list(project.labels))
        for model in models
    ]
