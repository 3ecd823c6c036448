"""The API's model schemas: a model version with its metrics, lineage and gate decision, and
predictions (`POST /projects/{p}/predict`)."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from services.api.schemas import Strict
from services.models import ModelVersion
from services.status import headline_report, is_imbalanced


class ClassScores(BaseModel):
    label: str
    precision: float
    recall: float
    f1: float
    support: int


class ModelSummary(BaseModel):
    """The headline figures of a model (from its evaluation-set report when it has one, else
    its validation split's). Rates are fractions in [0, 1]; losses are in nats."""

    evaluated_on: str
    n_items: int
    macro_f1: float
    minority_class: str | None = Field(
        description="The rarest class of the labels it trained on; null when the project is "
        "balanced (its rarest class has at least half the labels of its most common one)."
    )
    minority_f1: float | None
    minority_recall: float | None
    per_class: list[ClassScores]
    confusion: list[list[int]] = Field(description="[C, C]: rows true class, columns predicted.")
    hard_example_rate: float
    hard_threshold: float
    focal_loss_percentiles: dict[str, float]
    ece: float
    brier: float


class ModelPublic(BaseModel):
    version: int
    dataset_version: int
    lineage: list[int] = Field(description="Dataset versions behind it, newest first.")
    cycle_id: int | None
    promotion: str
    promotion_reason: str | None
    created_at: datetime
    promoted_at: datetime | None
    summary: ModelSummary | None
    ece_before_scaling: float | None
    ece_after_scaling: float | None
    temperature: float | None
    training_curve: dict[str, list[float]] = Field(description="train_loss, val_loss, val_error")
    parameters: dict[str, Any]
    metrics: dict[str, Any] = Field(description="Everything recorded, as stored.")

    @classmethod
    def of(cls, model: ModelVersion, labels: list[str], lineage: list[int]) -> "ModelPublic":
        metrics = dict(model.metrics)
        names = list(metrics.get("labels") or labels)
        which, report = headline_report(metrics)
        summary = None
        if which is not None and report is not None:
            skewed = is_imbalanced(metrics.get("class_counts"))
            summary = ModelSummary(
                evaluated_on=which,
                n_items=report["n_items"],
                macro_f1=report["macro_f1"],
                minority_class=names[report["minority_class"]] if skewed else None,
                minority_f1=report["minority_f1"] if skewed else None,
                minority_recall=report["minority_recall"] if skewed else None,
                per_class=[
                    ClassScores(
                        label=names[row["label"]],
                        precision=row["precision"],
                        recall=row["recall"],
                        f1=row["f1"],
                        support=row["support"],
                    )
                    for row in report["per_class"]
                ],
                confusion=report["confusion"],
                hard_example_rate=report["hard_example_rate"],
                hard_threshold=report["hard_threshold"],
                focal_loss_percentiles=report["focal_loss_percentiles"],
                ece=report["ece"],
                brier=report["brier"],
            )
        return cls(
            version=model.version,
            dataset_version=model.dataset_version,
            lineage=lineage,
            cycle_id=model.cycle_id,
            promotion=model.promotion,
            promotion_reason=model.promotion_reason,
            created_at=model.created_at,
            promoted_at=model.promoted_at,
            summary=summary,
            ece_before_scaling=metrics.get("ece_before"),
            ece_after_scaling=metrics.get("ece_after"),
            temperature=metrics.get("temperature"),
            training_curve={
                key: list(metrics.get(key) or []) for key in ("train_loss", "val_loss", "val_error")
            },
            parameters=dict(model.parameters),
            metrics=metrics,
        )


class PredictRequest(Strict):
    """Either `item_ids` (items of the pool, by their external id) or `features` (rows of the
    project's feature width; features projects only). At most 1,000 rows."""

    item_ids: list[str] | None = Field(default=None, min_length=1, max_length=1000)
    features: list[list[float]] | None = Field(default=None, min_length=1, max_length=1000)


class Prediction(BaseModel):
    item_id: str | None
    label: str
    probability: float
    probabilities: dict[str, float]


class PredictPublic(BaseModel):
    model_version: int
    predictions: list[Prediction]
