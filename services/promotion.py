"""The evaluation set and the promotion gate (the seeds' canary and rollback).

Each project reserves a random sample of its pool as an evaluation set: those items are labeled
first (at the front of each batch), never trained on and never picked by a strategy. A newly
trained model becomes current only if, on the labeled evaluation items, no class's recall drops
by more than `recall_tolerance` against the current model and macro-F1 does not drop. Until
every class has `min_labels_per_class` evaluation labels the model is promoted with that stated
as its reason, never as a silent pass.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from services.audit import record
from services.errors import Conflict, InvalidInput, NotFound
from services.ml.metrics import EvaluationReport
from services.models import Item, ItemStatus, ModelVersion, Project, Promotion, utcnow
from services.projects import get_project

INSUFFICIENT = "promoted without evaluation: insufficient labels"


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
        if self.eval_cap < 0:
            raise InvalidInput(f"eval_cap must be >= 0, got {self.eval_cap}")
        if not 0.0 < self.eval_batch_share <= 1.0:
            raise InvalidInput(f"eval_batch_share must be in (0, 1], got {self.eval_batch_share}")
        if not 0.0 <= self.recall_tolerance <= 1.0:
            raise InvalidInput(f"recall_tolerance must be in [0, 1], got {self.recall_tolerance}")
        if self.min_labels_per_class < 1:
            raise InvalidInput("min_labels_per_class must be >= 1")
        for label, target in self.recall_targets.items():
            if labels is not None and label not in labels:
                raise InvalidInput(f"recall target for unknown class {label!r}")
            if not 0.0 <= float(target) <= 1.0:
                raise InvalidInput(f"recall target of {label!r} must be in [0, 1], got {target}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_config(project: Project) -> GateConfig:
    return GateConfig.from_dict(dict(project.gate or {}))


def eval_target_size(config: GateConfig, pool_size: int) -> int:
    """How many items the evaluation set should hold for a pool of `pool_size` items."""
    return min(config.eval_cap, math.ceil(config.eval_fraction * pool_size))


def reserve_eval_set(session: Session, project: Project, *, seed: int) -> int:
    """Top the evaluation set up to its target size with a seeded random sample of unlabeled
    items (labeled ones are already training data, so they never join it). Returns how many
    were added; the set only grows, so its members never enter a training set."""
    config = gate_config(project)
    readable = session.exec(
        select(func.count())
        .select_from(Item)
        .where(Item.project_id == project.id, Item.status != ItemStatus.UNREADABLE)
    ).one()
    have = session.exec(
        select(func.count())
        .select_from(Item)
        .where(Item.project_id == project.id, col(Item.eval_set).is_(True))
    ).one()
    short = eval_target_size(config, int(readable)) - int(have)
    if short <= 0:
        return 0
    unlabeled = [
        item_id
        for (item_id,) in session.execute(
            sa.select(col(Item.id))
            .where(
                col(Item.project_id) == project.id,
                col(Item.status) == ItemStatus.UNLABELED,
                col(Item.eval_set).is_(False),
            )
            .order_by(col(Item.id))
        )
    ]
    if not unlabeled:
        return 0
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(unlabeled), size=min(short, len(unlabeled)), replace=False)
    ids = [unlabeled[int(i)] for i in np.sort(chosen)]
    for start in range(0, len(ids), 5000):
        session.execute(
            sa.update(Item)
            .where(col(Item.id).in_(ids[start : start + 5000]))
            .values(eval_set=True, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return len(ids)


def eval_picks(session: Session, project: Project, batch_size: int) -> list[int]:
    """Unlabeled evaluation items to put at the front of a batch of `batch_size` (at most
    `eval_batch_share` of it, at least one while any wait), in id order."""
    if batch_size < 1:
        return []
    share = gate_config(project).eval_batch_share
    room = max(1, math.floor(share * batch_size))
    return [
        item_id
        for (item_id,) in session.execute(
            sa.select(col(Item.id))
            .where(
                col(Item.project_id) == project.id,
                col(Item.status) == ItemStatus.UNLABELED,
                col(Item.eval_set).is_(True),
            )
            .order_by(col(Item.id))
            .limit(room)
        )
    ]


@dataclass(frozen=True)
class EvalLabels:
    """The labeled evaluation items: database ids [n] and class indices [n]."""

    item_ids: list[int]
    labels: list[int]

    def per_class(self, n_classes: int) -> list[int]:
        counts = np.bincount(np.array(self.labels, dtype=np.int64), minlength=n_classes)
        return [int(count) for count in counts]


def eval_labels(session: Session, project: Project) -> EvalLabels:
    index = {label: i for i, label in enumerate(project.labels)}
    rows = session.execute(
        sa.select(col(Item.id), col(Item.label))
        .where(
            col(Item.project_id) == project.id,
            col(Item.eval_set).is_(True),
            col(Item.status).in_([ItemStatus.LABELED, ItemStatus.IN_REVIEW]),
            col(Item.label).is_not(None),
        )
        .order_by(col(Item.id))
    ).all()
    kept = [(item_id, index[label]) for item_id, label in rows if label in index]
    return EvalLabels([i for i, _ in kept], [c for _, c in kept])


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


def _model(session: Session, project: Project, version: int) -> ModelVersion:
    model = session.exec(
        select(ModelVersion)
        .where(ModelVersion.project_id == project.id, ModelVersion.version == version)
        .with_for_update()
    ).first()
    if model is None:
        raise NotFound(f"project {project.name!r} has no model version {version}")
    return model


def make_current(
    session: Session, project_name: str, version: int, *, actor: str, action: str
) -> ModelVersion:
    """Make model `version` current by hand: `model.promote` (override a rejection or promote
    a candidate) or `model.rollback` (return to an earlier model). The replaced model is
    retired; both decisions are written to the audit log with the actor."""
    if action not in ("model.promote", "model.rollback"):
        raise InvalidInput(f"unknown model action {action!r}")
    project = get_project(session, project_name, for_update=True)
    model = _model(session, project, version)
    current = session.exec(
        select(ModelVersion).where(
            ModelVersion.project_id == project.id, ModelVersion.promotion == Promotion.CURRENT
        )
    ).first()
    if current is not None and current.version == version:
        raise Conflict(f"model m{version} of {project.name!r} is already current")
    if action == "model.rollback" and current is not None and version > current.version:
        raise InvalidInput(
            f"rollback goes to an earlier model; m{version} is newer than the current "
            f"m{current.version} (use promote)"
        )
    replaced = current.version if current is not None else None
    if current is not None:
        current.promotion = Promotion.RETIRED
        current.promotion_reason = (
            f"retired by {action.split('.')[1]} to m{version} ({actor}); was: "
            f"{current.promotion_reason or ''}"
        )[:2000]
        session.add(current)
        session.flush()  # the partial rule "one current" must see it retired first
    verb = "promoted" if action == "model.promote" else "rolled back"
    model.promotion = Promotion.CURRENT
    model.promotion_reason = (
        f"{verb} by {actor}"
        + (f" (replacing m{replaced})" if replaced is not None else "")
        + f"; gate said: {model.promotion_reason or 'nothing'}"
    )[:2000]
    model.promoted_at = utcnow()
    session.add(model)
    session.flush()
    record(
        session,
        actor=actor,
        action=action,
        project_id=project.id,
        target=f"model:m{version}",
        detail={"replaced": replaced},
    )
    return model
