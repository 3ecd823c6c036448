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

import sqlalchemy as sa
from sqlmodel import Session, col, select

from services.curve import curve_summary
from services.models import DatasetVersion, ModelVersion, Project
from services.status import headline_report

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
    focal-loss percentiles in nats.
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly; shallow copies (dataclasses.asdict's deep copy took 100 ms on 200
        models)."""
        return self.__dict__ | {"classes": [dict(c.__dict__) for c in self.classes]}


def _classes(summary: dict[str, Any], names: list[str]) -> list[ClassPoint]:
    points = []
    for c, support, predicted, hits, recall, precision in summary["classes"]:
        points.append(
            ClassPoint(
                label=names[c],
                support=support,
                predicted=predicted,
                recall=recall if support else None,
                recall_interval=wilson(hits, support),
                precision=precision if predicted else None,
                precision_interval=wilson(hits, predicted),
            )
        )
    return points


@dataclass(frozen=True)
class _Stored:
    """A model version's row, with its curve summary (services.curve)."""

    version: int
    dataset_version: int
    promotion: str
    reason: str | None
    summary: dict[str, Any]


def model_point(model: _Stored, labels: int, class_names: list[str]) -> ModelPoint:
    summary = model.summary
    names = list(summary.get("labels") or class_names)
    minority = summary.get("minority_class")
    return ModelPoint(
        version=model.version,
        dataset_version=model.dataset_version,
        labels=labels,
        promotion=model.promotion,
        reason=model.reason,
        evaluated_on=summary["evaluated_on"],
        n_items=summary["n_items"],
        macro_f1=summary["macro_f1"],
        minority=names[minority] if minority is not None else None,
        classes=_classes(summary, names),
        hard_example_rate=summary["hard_example_rate"],
        focal_loss_percentiles=dict(summary["focal_loss_percentiles"]),
        ece=summary["ece"],
        ece_before=summary["ece_before"],
        ece_after=summary["ece_after"],
        temperature=summary["temperature"],
    )


def learning_curve(session: Session, project: Project) -> list[ModelPoint]:
    """Every model version of the project, oldest first (without reliability diagrams: see
    `reliability_of`)."""
    rows = {
        version: rows or 0
        for version, rows in session.exec(
            select(DatasetVersion.version, DatasetVersion.row_count).where(
                DatasetVersion.project_id == project.id
            )
        )
    }
    stored = list(
        session.execute(
            sa.select(
                col(ModelVersion.version),
                col(ModelVersion.dataset_version),
                col(ModelVersion.promotion),
                col(ModelVersion.promotion_reason),
                col(ModelVersion.summary),
            )
            .where(col(ModelVersion.project_id) == project.id)
            .order_by(col(ModelVersion.version))
        )
    )
    # Models recorded before summaries existed: derived from their full metrics, once per read.
    missing = [version for version, *_, summary in stored if summary is None]
    derived = (
        {
            version: curve_summary(dict(metrics))
            for version, metrics in session.execute(
                sa.select(col(ModelVersion.version), col(ModelVersion.metrics)).where(
                    col(ModelVersion.project_id) == project.id,
                    col(ModelVersion.version).in_(missing),
                )
            )
        }
        if missing
        else {}
    )
    return [
        model_point(
            _Stored(version, dataset_version, promotion, reason, summary or derived[version]),
            rows.get(dataset_version, 0),
            list(project.labels),
        )
        for version, dataset_version, promotion, reason, summary in stored
    ]


def reliability_of(session: Session, project: Project) -> tuple[int, list[dict[str, float]]] | None:
    """The reliability diagram of the newest model whose held-out report recorded one."""
    for model in session.exec(
        select(ModelVersion)
        .where(ModelVersion.project_id == project.id)
        .order_by(col(ModelVersion.version).desc())
        .limit(5)  # the newest few; older reports predate reliability diagrams
    ):
        _, report = headline_report(model.metrics)
        if report is not None and report.get("reliability"):
            return model.version, list(report["reliability"])
    return None
