"""The evaluation set: a seeded random sample of the pool reserved for judging models. Its items
are labeled first (they lead each batch) and never picked by a strategy. A labeled item judges
the models trained while it is held out; once it has judged the gate's `eval_rounds` of them it
is released: training data from then on, no longer evidence, and the set takes a fresh item in
its place. Only unlabeled items join, so nothing ever trained on judges a model.

"Judged" is read from time: a model recorded after the item's label judged it (the judge reads
the labels when it starts, so a label that arrives while a model trains counts one model early;
the item is then released one model sooner, never trained on while still evidence).
"""

import math
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from services.gate import GateConfig, gate_config
from services.models import Item, ItemStatus, ModelVersion, Project, utcnow

LABELED_STATUSES = (ItemStatus.LABELED, ItemStatus.IN_REVIEW)


def eval_target_size(config: GateConfig, pool_size: int) -> int:
    """How many items the evaluation set should hold for a pool of `pool_size` items."""
    return min(config.eval_cap, math.ceil(config.eval_fraction * pool_size))


def released_eval_ids(session: Session, project: Project) -> set[int]:
    """Ids of the labeled evaluation items that have judged the gate's `eval_rounds` models:
    training data now (none while `eval_rounds` is None)."""
    rounds = gate_config(project).eval_rounds
    if rounds is None:
        return set()
    recorded = sorted(
        moment
        for (moment,) in session.execute(
            sa.select(col(ModelVersion.created_at)).where(
                col(ModelVersion.project_id) == project.id
            )
        )
    )
    if len(recorded) < rounds:
        return set()
    labeled = session.execute(
        sa.select(col(Item.id), col(Item.labeled_at)).where(
            col(Item.project_id) == project.id,
            col(Item.eval_set).is_(True),
            col(Item.status).in_(LABELED_STATUSES),
        )
    ).all()
    return {
        item_id
        for item_id, labeled_at in labeled
        if labeled_at is not None and len(recorded) - bisect_right(recorded, labeled_at) >= rounds
    }


def reserve_eval_set(session: Session, project: Project, *, seed: int) -> int:
    """Top the evaluation set's held items (unlabeled or still judging) up to its target size
    with a seeded random sample of unlabeled items (labeled ones are training data already, so
    they never join it). Returns how many were added."""
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
    held = int(have) - len(released_eval_ids(session, project))
    short = eval_target_size(config, int(readable)) - held
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


def waiting_evaluation(session: Session, project: Project, limit: int) -> list[int]:
    """Up to `limit` unlabeled evaluation items, in id order (how many lead a batch is the
    decision core's `evaluation_count`)."""
    if limit < 1:
        return []
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
            .limit(limit)
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
    """The held evaluation items' labels: labeled, not yet released into training."""
    released = released_eval_ids(session, project)
    index = {label: i for i, label in enumerate(project.labels)}
    rows = session.execute(
        sa.select(col(Item.id), col(Item.label))
        .where(
            col(Item.project_id) == project.id,
            col(Item.eval_set).is_(True),
            col(Item.status).in_(LABELED_STATUSES),
            col(Item.label).is_not(None),
        )
        .order_by(col(Item.id))
    ).all()
    kept = [
        (item_id, index[label])
        for item_id, label in rows
        if label in index and item_id not in released
    ]
    return EvalLabels([i for i, _ in kept], [c for _, c in kept])
