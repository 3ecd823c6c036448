"""The promotion gate: its settings and its decision on a newly trained model.

The gate judges on the evidence it has: the evaluation items neither model trained on (a random
sample of the pool, labeled for this; each becomes training data once it has judged
`eval_rounds` models) and the candidate's own predictions on its training items. It rejects
a collapsed model (one class for every training item) and one no better than always predicting
one class, even on a tiny evaluation set; against the current model it rejects an evident drop
of one class's recall (paired exact test) or of macro-F1 (paired bootstrap) beyond the
tolerances; otherwise it promotes and says on what evidence, or that the evidence is too thin to
compare. Pure: labels and predictions in, a decision out.
"""

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from services.errors import InvalidInput
from services.gate_evidence import (
    Labels,
    best_constant,
    macro_f1,
    macro_f1_drop_confidence,
    recall_changes,
)
from services.models import MAX_INT32, Project, Promotion

INSUFFICIENT = "promoted: evidence insufficient to compare"
MIN_EVIDENCE_ITEMS = 10  # fewer evaluation items than this: no comparison, only the sanity checks
SIGNIFICANCE = 0.05  # a recall drop counts when its one-sided p-value is below this
CONFIDENCE = 0.95  # a macro-F1 drop counts when this share of bootstrap resamples shows it
# Keys older versions stored that no longer mean anything (the fixed per-class threshold gave way
# to per-class tests): accepted and dropped, so a project saved by an older focalloop loads.
RETIRED_KEYS = frozenset({"min_labels_per_class"})


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GateConfig:
    """A project's evaluation set and promotion gate.

    eval_fraction: share of the pool the evaluation set holds at a time (capped at `eval_cap`).
    eval_batch_share: at most this share of each batch goes to unlabeled evaluation items (they
        come first in it); the rest is the strategy's.
    eval_rounds: models an evaluation item judges before it becomes training data (None: never;
        a fixed evaluation set, as earlier versions kept).
    recall_tolerance: the largest evident drop of any class's recall (a fraction) a model may show.
    macro_f1_tolerance: the largest evident drop of macro-F1 a model may show.
    alert_after_rejections: consecutive rejected models after which the project raises an alert.
    recall_targets: class -> recall the operators expect (alerting only; not a gate).
    """

    eval_fraction: float = 0.05
    eval_cap: int = 2000
    eval_batch_share: float = 0.2
    eval_rounds: int | None = 5
    recall_tolerance: float = 0.05
    macro_f1_tolerance: float = 0.05
    alert_after_rejections: int = 3
    recall_targets: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any], labels: list[str] | None = None) -> "GateConfig":
        values = {key: value for key, value in values.items() if key not in RETIRED_KEYS}
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
        if self.eval_rounds is not None and not (
            _whole(self.eval_rounds) and 1 <= self.eval_rounds <= 1000
        ):
            raise InvalidInput("eval_rounds must be a whole number in [1, 1000] or null")
        for name in ("recall_tolerance", "macro_f1_tolerance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInput(f"{name} must be a number, got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise InvalidInput(f"{name} must be in [0, 1], got {value}")
        if not (_whole(self.alert_after_rejections) and 1 <= self.alert_after_rejections <= 1000):
            raise InvalidInput("alert_after_rejections must be a whole number in [1, 1000]")
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


@dataclass(frozen=True)
class Evidence:
    """What the gate sees. truth [n]: labels of the evaluation items neither model trained on;
    candidate [n] / current [n]: each model's predicted class for them (current None when there
    is no current model or it cannot score this label set). fit_truth [m] / fit_predicted [m]:
    the candidate's training labels and its predictions for those items."""

    truth: Labels
    candidate: Labels
    current: Labels | None
    fit_truth: Labels
    fit_predicted: Labels


def decide(
    *, labels: list[str], evidence: Evidence, config: GateConfig, has_current: bool
) -> Decision:
    """The gate's decision on the candidate (see the module's docstring for the rules)."""
    n_classes = len(labels)
    refusal = _sanity(labels, evidence)
    if refusal is not None:
        return Decision(Promotion.REJECTED, refusal)
    truth, n = evidence.truth, len(evidence.truth)
    score = (
        f"evaluation macro-F1 {macro_f1(truth, evidence.candidate, n_classes):.3f}"
        if n
        else ("no evaluation items yet")
    )
    if not has_current:
        return Decision(Promotion.CURRENT, f"promoted: first model ({score})")
    if evidence.current is None:
        return Decision(
            Promotion.CURRENT,
            f"promoted: the current model was trained on another label set and cannot be "
            f"compared ({score})",
        )
    if n < MIN_EVIDENCE_ITEMS or len(np.unique(truth)) < 2:
        return Decision(
            Promotion.CURRENT,
            f"{INSUFFICIENT} ({n} evaluation items neither model trained on; a comparison "
            f"needs {MIN_EVIDENCE_ITEMS} of two classes or more); not collapsed",
        )
    return _compare(labels, truth, evidence.candidate, evidence.current, config)


def _sanity(labels: list[str], evidence: Evidence) -> str | None:
    """Why the candidate is unusable whatever the current model is, or None."""
    fit_classes = np.unique(evidence.fit_truth)
    predicted = np.unique(evidence.fit_predicted)
    if len(fit_classes) >= 2 and len(predicted) == 1:
        return (
            f"rejected: collapsed: predicts {labels[int(predicted[0])]!r} for every one of its "
            f"{len(evidence.fit_truth)} training items ({len(fit_classes)} classes)"
        )
    truth = evidence.truth
    if len(truth) >= MIN_EVIDENCE_ITEMS and len(np.unique(truth)) >= 2:
        constant, baseline = best_constant(truth, len(labels))
        score = macro_f1(truth, evidence.candidate, len(labels))
        if score <= baseline + 1e-12:
            return (
                f"rejected: no better than a constant predictor: evaluation macro-F1 "
                f"{score:.3f} <= {baseline:.3f} of predicting {labels[constant]!r} for every "
                f"item ({len(truth)} items)"
            )
    return None


def _compare(
    labels: list[str], truth: Labels, candidate: Labels, current: Labels, config: GateConfig
) -> Decision:
    n_classes = len(labels)
    changes = recall_changes(truth, candidate, current, n_classes)
    beyond = [c for c in changes if c.drop > config.recall_tolerance + 1e-12]
    evident = [c for c in beyond if c.p_value < SIGNIFICANCE]
    if evident:
        drops = "; ".join(
            f"{labels[c.label]} recall {c.current_recall:.3f} -> {c.candidate_recall:.3f} on "
            f"{c.items} items, p={c.p_value:.3f}"
            for c in evident
        )
        return Decision(
            Promotion.REJECTED,
            f"rejected: recall dropped by more than {config.recall_tolerance:.3f} ({drops})",
        )
    old, new = macro_f1(truth, current, n_classes), macro_f1(truth, candidate, n_classes)
    if old - new > config.macro_f1_tolerance:
        confidence = macro_f1_drop_confidence(
            truth, candidate, current, n_classes, config.macro_f1_tolerance
        )
        if confidence >= CONFIDENCE:
            return Decision(
                Promotion.REJECTED,
                f"rejected: macro-F1 dropped {old:.3f} -> {new:.3f}, by more than "
                f"{config.macro_f1_tolerance:.3f} in {confidence:.0%} of bootstrap resamples "
                f"of {len(truth)} evaluation items",
            )
    thin = "".join(
        f"; not evident: {labels[c.label]} recall {c.current_recall:.3f} -> "
        f"{c.candidate_recall:.3f} on {c.items} items"
        for c in beyond
    )
    return Decision(
        Promotion.CURRENT,
        f"promoted: macro-F1 {old:.3f} -> {new:.3f} on {len(truth)} evaluation items, no "
        f"class's recall evidently dropped by more than {config.recall_tolerance:.3f}{thin}",
    )
