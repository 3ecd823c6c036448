"""The promotion gate: its settings and its decision on a newly trained model.

A new model becomes current only if, on the labeled evaluation items, no class's recall drops by
more than `recall_tolerance` against the current model and macro-F1 does not drop. Until every
class has `min_labels_per_class` evaluation labels the model is promoted with that stated as its
reason, never as a silent pass. Pure: reports in, a decision out.
"""

from dataclasses import asdict, dataclass, field
from typing import Any

from services.errors import InvalidInput
from services.ml.metrics import EvaluationReport
from services.models import MAX_INT32, Project, Promotion

INSUFFICIENT = "promoted without evaluation: insufficient labels"


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GateConfig:
    """A project's evaluation set and promotion gate.

    eval_fraction: share of the pool reserved (capped at `eval_cap` items).
    eval_batch_share: at most this share of each batch goes to unlabeled evaluation items (they
        come first in it), so a large evaluation set does not stall selection for many cycles;
        1.0 labels the whole evaluation set before any selected item.
    recall_tolerance: the largest drop of any class's recall (a fraction) a new model may show.
    min_labels_per_class: evaluation labels each class needs before the gate compares models.
    recall_targets: class -> recall the operators expect (alerting only; not a gate).
    """

    eval_fraction: float = 0.05
    eval_cap: int = 2000
    eval_batch_share: float = 0.5
    recall_tolerance: float = 0.05
    min_labels_per_class: int = 5
    recall_targets: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any], labels: list[str] | None = None) -> "GateConfig":
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInput(f"unknown gate settings {sorted(unknown)}")
        try:
            config = cls(**values)
            config.check(labels)
        except InvalidInput:
            raise
        except (TypeError, ValueError) as error:  # a value of the wrong type
            raise InvalidInput(f"invalid gate settings: {error}") from None
        return config

    def check(self, labels: list[str] | None) -> None:
        if not 0.0 <= self.eval_fraction <= 0.5:
            raise InvalidInput(f"eval_fraction must be in [0, 0.5], got {self.eval_fraction}")
        if not (_whole(self.eval_cap) and 0 <= self.eval_cap <= MAX_INT32):
            raise InvalidInput(f"eval_cap must be a whole number in [0, {MAX_INT32}]")
        if not 0.0 < self.eval_batch_share <= 1.0:
            raise InvalidInput(f"eval_batch_share must be in (0, 1], got {self.eval_batch_share}")
        if not 0.0 <= self.recall_tolerance <= 1.0:
            raise InvalidInput(f"recall_tolerance must be in [0, 1], got {self.recall_tolerance}")
        if not (_whole(self.min_labels_per_class) and 1 <= self.min_labels_per_class <= MAX_INT32):
            raise InvalidInput(f"min_labels_per_class must be a whole number in [1, {MAX_INT32}]")
        if not isinstance(self.recall_targets, dict):
            raise InvalidInput("recall_targets must map class names to recalls")
        for label, target in self.recall_targets.items():
            if labels is not None and label not in labels:
                raise InvalidInput(f"recall target for unknown class {label!r}")
            if not 0.0 <= float(target) <= 1.0:
                raise InvalidInput(f"recall target of {label!r} must be in [0, 1], got {target}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_config(project: Project) -> GateConfig:
    return GateConfig.from_dict(dict(project.gate or {}))


@dataclass(frozen=True)
class Decision:
    promotion: Promotion
    reason: str


def decide(
    *,
    labels: list[str],
    per_class_counts: list[int],
    candidate: EvaluationReport | None,
    current: EvaluationReport | None,
    config: GateConfig,
    has_current: bool,
) -> Decision:
    """The gate. `candidate`/`current`: both models' reports on the same evaluation items
    (None when there are none, or when the current model cannot score this label set)."""
    short = [
        f"{label} {count}/{config.min_labels_per_class}"
        for label, count in zip(labels, per_class_counts, strict=True)
        if count < config.min_labels_per_class
    ]
    if short or candidate is None:
        detail = ", ".join(short) if short else "no evaluation labels"
        return Decision(Promotion.CURRENT, f"{INSUFFICIENT} (evaluation labels: {detail})")
    if not has_current:
        return Decision(
            Promotion.CURRENT,
            f"promoted: first model (evaluation macro-F1 {candidate.macro_f1:.3f})",
        )
    if current is None:
        return Decision(
            Promotion.CURRENT,
            "promoted: the current model was trained on another label set and cannot be "
            f"compared (evaluation macro-F1 {candidate.macro_f1:.3f})",
        )
    drops = [
        f"{label} recall {old.recall:.3f} -> {new.recall:.3f}"
        for label, old, new in zip(labels, current.per_class, candidate.per_class, strict=True)
        if old.recall - new.recall > config.recall_tolerance + 1e-12
    ]
    if drops:
        return Decision(
            Promotion.REJECTED,
            f"rejected: recall dropped by more than {config.recall_tolerance:.3f} "
            f"({'; '.join(drops)})",
        )
    if candidate.macro_f1 < current.macro_f1 - 1e-12:
        return Decision(
            Promotion.REJECTED,
            f"rejected: macro-F1 dropped {current.macro_f1:.3f} -> {candidate.macro_f1:.3f}",
        )
    return Decision(
        Promotion.CURRENT,
        f"promoted: macro-F1 {current.macro_f1:.3f} -> {candidate.macro_f1:.3f}, no class's "
        f"recall dropped by more than {config.recall_tolerance:.3f} "
        f"({len(labels)} classes, {candidate.n_items} evaluation items)",
    )
