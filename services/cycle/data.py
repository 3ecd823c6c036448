"""What the stages read from the pool and the dataset versions: decoded items by id, a
version's training rows, the shards to score, the unlabeled items, label counts.

Evaluation items are never training rows and never selectable: every reader here says which of
the two it returns.
"""

from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa
from numpy.typing import NDArray
from sqlmodel import Session, col

from services.config import Settings
from services.datasets.pool import load_shard
from services.datasets.snapshot import get_version
from services.datasets.store import DatasetStore, open_store
from services.datasets.versions import read_version
from services.errors import PermanentError
from services.evaluation_set import released_eval_ids
from services.models import Cycle, Item, ItemStatus, Project


def project_store(project: Project, settings: Settings) -> DatasetStore:
    return open_store(project.store_url, settings, create=True)


def load_items(
    session: Session, project: Project, item_ids: Sequence[int], settings: Settings
) -> NDArray[np.float32]:
    """The decoded data of items (by database id), in the order given: [n, *item_shape].

    Each shard involved is read (and its hash checked) once per call. Nothing is cached across
    calls: a decoded image shard is hundreds of MB, and scoring reads each shard once anyway.
    """
    rows: dict[int, tuple[str | None, int | None]] = {}
    wanted = list(item_ids)
    for start in range(0, len(wanted), 5000):  # bounded IN lists on every backend
        rows.update(
            (item_id, (shard_key, shard_row))
            for item_id, shard_key, shard_row in session.execute(
                sa.select(col(Item.id), col(Item.shard_key), col(Item.shard_row)).where(
                    col(Item.id).in_(wanted[start : start + 5000])
                )
            )
        )
    missing = [i for i in item_ids if i not in rows or rows[i][0] is None]
    if missing:
        raise PermanentError(f"items {missing[:5]} have no decoded data in the pool")
    store = project_store(project, settings)
    positions_by_shard: dict[str, list[int]] = {}
    for position, item_id in enumerate(item_ids):
        positions_by_shard.setdefault(str(rows[item_id][0]), []).append(position)
    output: NDArray[np.float32] | None = None
    for shard_key, positions in positions_by_shard.items():
        shard = load_shard(store, shard_key)
        if output is None:
            output = np.empty((len(item_ids), *shard.data.shape[1:]), dtype=np.float32)
        shard_rows = [int(rows[item_ids[p]][1] or 0) for p in positions]
        output[positions] = shard.data[shard_rows]
    assert output is not None
    return output


def training_rows(
    session: Session, project: Project, version: int, settings: Settings
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Labels [m] (class indices) and item ids [m] (database ids) of a committed dataset
    version's training rows: every row but the held evaluation items' (those released into
    training, having judged their models, train)."""
    store = project_store(project, settings)
    _, table = read_version(store, project.name, version)
    external_ids = table["item_id"].to_pylist()
    index = {label: i for i, label in enumerate(project.labels)}
    labels = [index[label] for label in table["label"].to_pylist()]
    found: dict[str, tuple[int, bool]] = {}
    for start in range(0, len(external_ids), 5000):
        chunk = external_ids[start : start + 5000]
        found.update(
            (external_id, (item_id, eval_set))
            for external_id, item_id, eval_set in session.execute(
                sa.select(col(Item.external_id), col(Item.id), col(Item.eval_set)).where(
                    col(Item.project_id) == project.id, col(Item.external_id).in_(chunk)
                )
            )
        )
    missing = [e for e in external_ids if e not in found]
    if missing:
        raise PermanentError(f"dataset v{version} names items not in the pool, e.g. {missing[:5]}")
    released = released_eval_ids(session, project)
    kept = [
        (found[e][0], label)
        for e, label in zip(external_ids, labels, strict=True)
        if not found[e][1] or found[e][0] in released
    ]
    return (
        np.array([label for _, label in kept], dtype=np.int64),
        np.array([item_id for item_id, _ in kept], dtype=np.int64),
    )


def training_data(
    session: Session, project: Project, version: int, settings: Settings
) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.int64]]:
    """items [m, *shape], labels [m] (class indices) and item ids [m] (database ids) of a
    committed dataset version's training rows."""
    labels, item_ids = training_rows(session, project, version, settings)
    items = load_items(session, project, item_ids.tolist(), settings)
    return items, labels, item_ids


def is_cold_start(session: Session, project: Project, cycle: Cycle, settings: Settings) -> bool:
    """Whether the cycle has too little training data for a model: fewer than two classes
    among the version's training rows (evaluation items do not count)."""
    if cycle.dataset_version is None:
        return True
    counts = get_version(session, project, cycle.dataset_version).class_counts or {}
    if sum(1 for count in counts.values() if count > 0) < 2:
        return True
    labels, _ = training_rows(session, project, cycle.dataset_version, settings)
    return len(np.unique(labels)) < 2


# Scored each cycle: unlabeled items are the candidates; queued ones (waiting in the labeling
# tool) are scored too, so their tasks' predictions follow the current model.
SCORED_STATUSES = (ItemStatus.UNLABELED, ItemStatus.QUEUED)


def scored_shards(session: Session, project: Project, *, selecting: bool) -> list[str]:
    """Keys of the pool shards holding items to score: unlabeled and queued ones, or only the
    queued ones (their tasks' predictions) when the cycle has nothing left to select."""
    statuses = SCORED_STATUSES if selecting else (ItemStatus.QUEUED,)
    return sorted(
        key
        for (key,) in session.execute(
            sa.select(col(Item.shard_key))
            .where(
                col(Item.project_id) == project.id,
                col(Item.status).in_(statuses),
                col(Item.shard_key).is_not(None),
            )
            .distinct()
        )
    )


def label_counts(session: Session, project: Project, cycle: Cycle) -> NDArray[np.int64]:
    """Labels per class [C] in the cycle's dataset version (evaluation labels included: they
    say which classes have been found)."""
    if cycle.dataset_version is None:
        return np.zeros(len(project.labels), dtype=np.int64)
    counts = get_version(session, project, cycle.dataset_version).class_counts or {}
    return np.array([counts.get(label, 0) for label in project.labels], dtype=np.int64)


def unlabeled_ids(session: Session, project: Project) -> list[int]:
    """Selectable items (unlabeled, outside the evaluation set), in id order."""
    return sorted(
        item_id
        for (item_id,) in session.execute(
            sa.select(col(Item.id)).where(
                col(Item.project_id) == project.id,
                col(Item.status) == ItemStatus.UNLABELED,
                col(Item.eval_set).is_(False),
            )
        )
    )


def labeled_ids(session: Session, project: Project) -> list[int]:
    """Items with a label (evaluation items included: their class is known too), in id order."""
    return sorted(
        item_id
        for (item_id,) in session.execute(
            sa.select(col(Item.id)).where(
                col(Item.project_id) == project.id,
                col(Item.status).in_((ItemStatus.LABELED, ItemStatus.IN_REVIEW)),
            )
        )
    )


def still_unlabeled(session: Session, item_ids: list[int]) -> set[int]:
    """Those of `item_ids` still unlabeled now (an answer may have arrived since scoring)."""
    found: set[int] = set()
    for start in range(0, len(item_ids), 5000):
        found.update(
            item_id
            for (item_id,) in session.execute(
                sa.select(col(Item.id)).where(
                    col(Item.id).in_(item_ids[start : start + 5000]),
                    col(Item.status) == ItemStatus.UNLABELED,
                )
            )
        )
    return found
