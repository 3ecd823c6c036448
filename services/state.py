"""Status changes and annotations: the only code that writes `Item.status`, `Item.label` or
`Cycle.state`.

Every status change is a conditional UPDATE (`... WHERE status = <the status we read>`): if
another writer moved the row first, the update matches nothing and `Conflict` is raised instead
of silently overwriting its change. Illegal changes raise `IllegalTransition`.
"""

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from services.db import insert_unless_present
from services.errors import Conflict, IllegalTransition, InvalidInput, NotFound
from services.models import (
    CYCLE_TRANSITIONS,
    FINAL_CYCLE_STATES,
    ITEM_TRANSITIONS,
    Annotation,
    AnnotationTombstone,
    Cycle,
    CycleState,
    Item,
    ItemStatus,
    Project,
    utcnow,
)

T = TypeVar("T")
log = logging.getLogger("focalloop.state")


def _load_item(session: Session, item_id: int) -> Item:
    item = session.get(Item, item_id)
    if item is None:
        raise NotFound(f"no item with id {item_id}")
    return item


def transition_items(
    session: Session,
    item_ids: Iterable[int],
    to: ItemStatus,
    *,
    expected: ItemStatus,
    reason: str | None = None,
) -> int:
    """Move every item in `item_ids` from `expected` to `to` in one UPDATE.

    Raises IllegalTransition when `expected -> to` is not allowed, and Conflict (changing
    nothing) when any of the items is not in `expected` status. Returns the number moved.
    """
    if to not in ITEM_TRANSITIONS[expected]:
        raise IllegalTransition(kind="item", row_id=-1, current=expected, requested=to)
    ids = sorted(set(item_ids))
    if not ids:
        return 0
    moved = 0
    # Chunked so the IN list stays well under every backend's parameter limit.
    for start in range(0, len(ids), 5000):
        chunk = ids[start : start + 5000]
        result = session.execute(
            sa.update(Item)
            .where(col(Item.id).in_(chunk), col(Item.status) == expected)
            .values(status=to, status_reason=reason, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        moved += result.rowcount  # type: ignore[attr-defined]
    if moved != len(ids):
        raise Conflict(
            f"{len(ids) - moved} of {len(ids)} items were not {expected} any more; none moved"
        )
    _expire_items(session)
    return moved


def move_items_still_in(
    session: Session, item_ids: Iterable[int], to: ItemStatus, *, expected: ItemStatus
) -> int:
    """Move those of `item_ids` still in `expected` to `to`; the others were moved by another
    writer (e.g. an answer arrived first) and are left as they are. Returns how many moved."""
    if to not in ITEM_TRANSITIONS[expected]:
        raise IllegalTransition(kind="item", row_id=-1, current=expected, requested=to)
    ids = sorted(set(item_ids))
    moved = 0
    for chunk in _chunks(ids):
        result = session.execute(
            sa.update(Item)
            .where(col(Item.id).in_(chunk), col(Item.status) == expected)
            .values(status=to, status_reason=None, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        moved += result.rowcount  # type: ignore[attr-defined]
    _expire_items(session)
    return moved


def _expire_items(session: Session) -> None:
    """Forget loaded Item rows after a Core UPDATE changed them behind the ORM's back. Only
    Items: expiring everything would make every other loaded row reload one by one."""
    for instance in list(session.identity_map.values()):
        if isinstance(instance, Item):
            session.expire(instance)


def transition_item(
    session: Session, item_id: int, to: ItemStatus, *, reason: str | None = None
) -> Item:
    """Move one item to `to` from whatever legal status it is in now."""
    item = _load_item(session, item_id)
    current = ItemStatus(item.status)
    if to not in ITEM_TRANSITIONS[current]:
        raise IllegalTransition(kind="item", row_id=item_id, current=current, requested=to)
    transition_items(session, [item_id], to, expected=current, reason=reason)
    session.refresh(item)
    return item


@dataclass(frozen=True)
class AnnotationInput:
    """One answer from a labeler. label None with cancelled=True is a skip; external_id and
    updated_at identify the revision (a duplicate delivery of the same pair stores nothing)."""

    item_id: int
    label: str | None
    source: str
    external_id: str
    updated_at: datetime
    annotator: str
    cancelled: bool = False


def record_annotation(session: Session, answer: AnnotationInput) -> Annotation | None:
    """Store an answer and bring the item's label and status up to date.

    Returns the new row, or None when this exact revision was already stored (a duplicate
    event). Raises InvalidInput for a label outside the project's label set (nothing stored) and
    IllegalTransition for an unreadable item.
    """
    return record_annotations(session, [answer])[0]


def _chunks(values: Sequence[T], size: int = 5000) -> Iterator[Sequence[T]]:
    # Bounded IN lists on every backend.
    for start in range(0, len(values), size):
        yield values[start : start + size]


def record_annotations(
    session: Session, answers: Sequence[AnnotationInput]
) -> list[Annotation | None]:
    """`record_annotation` for many answers at once, in a fixed number of statements (what bulk
    ingestion needs). Every answer is checked before anything is written: one bad answer raises
    (as record_annotation would) and stores nothing. Returns, per answer, its new row or None
    for a revision already stored (in the database or earlier in `answers`)."""
    if not answers:
        return []
    item_ids = sorted({answer.item_id for answer in answers})
    items: dict[int, tuple[int, str]] = {}
    for chunk in _chunks(item_ids):
        items.update(
            (item_id, (project_id, status))
            for item_id, project_id, status in session.execute(
                sa.select(col(Item.id), col(Item.project_id), col(Item.status)).where(
                    col(Item.id).in_(chunk)
                )
            )
        )
    labels = {
        project.id: project
        for project in session.exec(
            select(Project).where(col(Project.id).in_({p for p, _ in items.values()}))
        ).all()
    }
    for answer in answers:
        if answer.item_id not in items:
            raise NotFound(f"no item with id {answer.item_id}")
        project_id, status = items[answer.item_id]
        project = labels[project_id]
        if answer.cancelled:
            if answer.label is not None:
                raise InvalidInput("a cancelled answer carries no label")
        elif answer.label not in project.labels:
            raise InvalidInput(
                f"label {answer.label!r} is not in project {project.name!r}'s label set "
                f"{project.labels}; the answer was not stored"
            )
        if status == ItemStatus.UNREADABLE:
            raise IllegalTransition(
                kind="item", row_id=answer.item_id, current=status, requested=ItemStatus.LABELED
            )
        if answer.updated_at.tzinfo is None:
            raise InvalidInput("annotation times must be timezone-aware")
    seen: set[tuple[int, str, str, datetime]] = set()
    external_ids = sorted({answer.external_id for answer in answers})
    for id_chunk in _chunks(external_ids):
        seen.update(
            (project_id, source, external_id, updated_at.astimezone(UTC))
            for project_id, source, external_id, updated_at in session.execute(
                sa.select(
                    col(Annotation.project_id),
                    col(Annotation.source),
                    col(Annotation.external_id),
                    col(Annotation.external_updated_at),
                ).where(
                    col(Annotation.project_id).in_(list(labels)),
                    col(Annotation.external_id).in_(id_chunk),
                )
            )
        )
    deleted = tombstoned(session, [p for p in labels if p is not None], external_ids)
    rows: list[Annotation | None] = []
    for answer in answers:
        project_id = items[answer.item_id][0]
        key = (project_id, answer.source, answer.external_id, answer.updated_at.astimezone(UTC))
        if key in seen or (project_id, answer.source, answer.external_id) in deleted:
            # A revision of a deleted annotation arrived late (or before its own delete was
            # applied, in a reordered batch): the deletion wins, whatever the revision's stamp.
            rows.append(None)
            continue
        seen.add(key)
        rows.append(
            Annotation(
                project_id=project_id,
                item_id=answer.item_id,
                label=answer.label,
                cancelled=answer.cancelled,
                source=answer.source,
                external_id=answer.external_id,
                external_updated_at=answer.updated_at,
                annotator=answer.annotator,
            )
        )
    new = [row for row in rows if row is not None]
    try:
        with session.begin_nested():
            session.add_all(new)
    except sa.exc.IntegrityError:
        # A concurrent delivery stored some of these revisions first: insert one by one and
        # drop the ones that lost.
        for position, row in enumerate(rows):
            if row is None:
                continue
            fresh = Annotation(**row.model_dump(exclude={"id"}))
            try:
                with session.begin_nested():
                    session.add(fresh)
                rows[position] = fresh
            except sa.exc.IntegrityError:
                rows[position] = None
    refresh_labels(session, [row.item_id for row in rows if row is not None])
    return rows


def tombstoned(
    session: Session, project_ids: Sequence[int], external_ids: Sequence[str]
) -> set[tuple[int, str, str]]:
    """(project, source, external id) of the deleted annotations among `external_ids`."""
    found: set[tuple[int, str, str]] = set()
    for chunk in _chunks(sorted(set(external_ids))):
        found.update(
            (project_id, source, external_id)
            for project_id, source, external_id in session.execute(
                sa.select(
                    col(AnnotationTombstone.project_id),
                    col(AnnotationTombstone.source),
                    col(AnnotationTombstone.external_id),
                ).where(
                    col(AnnotationTombstone.project_id).in_(list(project_ids)),
                    col(AnnotationTombstone.external_id).in_(chunk),
                )
            )
        )
    return found


def withdraw_annotation(session: Session, *, project_id: int, source: str, external_id: str) -> int:
    """Mark every revision of an external annotation withdrawn (its label stops counting) and
    refresh the items' labels. Returns the revisions newly withdrawn (0 on a repeat)."""
    return withdraw_annotations(
        session, project_id=project_id, source=source, external_ids=[external_id]
    )


def withdraw_annotations(
    session: Session, *, project_id: int, source: str, external_ids: Sequence[str]
) -> int:
    """`withdraw_annotation` for many external ids in a fixed number of statements. Each id is
    also tombstoned, so a revision of it that arrives later, or a delete that arrives before its
    create, leaves no label behind."""
    item_ids: set[int] = set()
    withdrawn = 0
    now = utcnow()
    if external_ids:
        insert = insert_unless_present(
            session.get_bind().dialect.name,
            AnnotationTombstone,
            ["project_id", "source", "external_id"],
        )
        session.execute(
            insert,
            [
                {
                    "project_id": project_id,
                    "source": source,
                    "external_id": external_id,
                    "deleted_at": now,
                }
                for external_id in sorted(set(external_ids))
            ],
        )
    for chunk in _chunks(sorted(set(external_ids))):
        condition = sa.and_(
            col(Annotation.project_id) == project_id,
            col(Annotation.source) == source,
            col(Annotation.external_id).in_(chunk),
            col(Annotation.withdrawn_at).is_(None),
        )
        item_ids.update(
            item_id
            for (item_id,) in session.execute(sa.select(col(Annotation.item_id)).where(condition))
        )
        result = session.execute(
            sa.update(Annotation)
            .where(condition)
            .values(withdrawn_at=now)
            .execution_options(synchronize_session=False)
        )
        withdrawn += result.rowcount  # type: ignore[attr-defined]
    refresh_labels(session, sorted(item_ids))
    return withdrawn


def live_answers(session: Session, item_id: int) -> list[Annotation]:
    """The newest revision of each annotation of an item, withdrawn ones left out, oldest
    first."""
    return _live_answers(session, [item_id]).get(item_id, [])


def _live_answers(session: Session, item_ids: Sequence[int]) -> dict[int, list[Annotation]]:
    newest: dict[tuple[int, str, str], Annotation] = {}
    for chunk in _chunks(sorted(set(item_ids))):
        for row in session.exec(
            select(Annotation)
            .where(col(Annotation.item_id).in_(chunk), col(Annotation.withdrawn_at).is_(None))
            .order_by(col(Annotation.external_updated_at), col(Annotation.id))
        ).all():
            newest[(row.item_id, row.source, row.external_id)] = row  # later rows are newer
    grouped: dict[int, list[Annotation]] = {}
    for row in newest.values():
        grouped.setdefault(row.item_id, []).append(row)
    return {
        item_id: sorted(rows, key=lambda r: (r.external_updated_at, r.id or 0))
        for item_id, rows in grouped.items()
    }


def refresh_label(session: Session, item: Item) -> Item:
    """Derive an item's label from its annotations (see refresh_labels)."""
    refresh_labels(session, [item.id or 0])
    session.refresh(item)
    return item


def refresh_labels(session: Session, item_ids: Sequence[int]) -> None:
    """Derive items' labels from their annotations: the newest live, non-cancelled answer.

    Also records how many annotators have a live answer and whether they disagree. Status
    follows: an item with a label becomes labeled; one whose labels were all withdrawn returns
    to unlabeled; cancelled answers alone change nothing. A fixed number of statements for any
    number of items.
    """
    ids = sorted(set(item_ids))
    if not ids:
        return
    session.flush()
    statuses: dict[int, ItemStatus] = {}
    for chunk in _chunks(ids):
        statuses.update(
            (item_id, ItemStatus(status))
            for item_id, status in session.execute(
                sa.select(col(Item.id), col(Item.status)).where(col(Item.id).in_(chunk))
            )
        )
    answers_by_item = _live_answers(session, ids)
    moves: dict[tuple[ItemStatus, ItemStatus, str | None], list[int]] = {}
    values: list[dict[str, Any]] = []
    now = utcnow()
    for item_id in ids:
        answers = [row for row in answers_by_item.get(item_id, []) if not row.cancelled]
        per_annotator: dict[str, str] = {}
        for row in answers:
            assert row.label is not None
            per_annotator[row.annotator] = row.label  # later rows are newer
        current = answers[-1] if answers else None
        status = statuses[item_id]
        if current is not None and status != ItemStatus.LABELED:
            moves.setdefault((status, ItemStatus.LABELED, None), []).append(item_id)
        elif current is None and status in (ItemStatus.LABELED, ItemStatus.IN_REVIEW):
            moves.setdefault((status, ItemStatus.UNLABELED, "label withdrawn"), []).append(item_id)
        values.append(
            {
                "id": item_id,
                "label": current.label if current else None,
                "label_source": current.source if current else None,
                "annotator": current.annotator if current else None,
                "labeled_at": current.external_updated_at if current else None,
                "n_annotators": len(per_annotator),
                "disagreement": len(set(per_annotator.values())) > 1,
                "updated_at": now,
            }
        )
    for (expected, to, reason), moved in moves.items():
        transition_items(session, moved, to, expected=expected, reason=reason)
    session.execute(sa.update(Item), values)  # bulk UPDATE by primary key
    _expire_items(session)


def transition_cycle(
    session: Session, cycle_id: int, to: CycleState, *, reason: str | None = None
) -> Cycle:
    """Move a cycle to `to`, appending to its timeline; a conditional UPDATE as for items.
    Failing a cycle needs a reason."""
    cycle = session.get(Cycle, cycle_id)
    if cycle is None:
        raise NotFound(f"no cycle with id {cycle_id}")
    current = CycleState(cycle.state)
    if to not in CYCLE_TRANSITIONS[current]:
        raise IllegalTransition(kind="cycle", row_id=cycle_id, current=current, requested=to)
    if to == CycleState.FAILED and not reason:
        raise InvalidInput("a failed cycle needs a reason")
    now = utcnow()
    values: dict[str, object] = {
        "state": to,
        "updated_at": now,
        "timeline": [*cycle.timeline, {"state": str(to), "at": now.isoformat()}],
    }
    if to == CycleState.FAILED:
        values["failure_reason"] = reason
    if to in FINAL_CYCLE_STATES:
        values["finished_at"] = now
    result = session.execute(
        sa.update(Cycle)
        .where(col(Cycle.id) == cycle_id, col(Cycle.state) == current)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict(f"cycle {cycle_id} left {current} while moving to {to}; not changed")
    session.refresh(cycle)
    log.info(
        "cycle %d: %s -> %s",
        cycle_id,
        current.value,
        to.value,
        extra={"cycle_id": cycle_id, "state": to.value, "reason": reason},
    )
    return cycle


def create_cycle(session: Session, *, project_id: int, trigger: str) -> Cycle:
    """A new pending cycle, numbered after the project's last one. The database's partial
    unique index allows one non-final cycle per project (and the number is unique per project),
    so two concurrent starts cannot both succeed: the loser gets Conflict."""
    now = utcnow()
    last = session.exec(select(func.max(Cycle.number)).where(Cycle.project_id == project_id)).one()
    cycle = Cycle(
        project_id=project_id,
        number=(last or 0) + 1,
        trigger=trigger,
        timeline=[{"state": str(CycleState.PENDING), "at": now.isoformat()}],
        created_at=now,
        updated_at=now,
    )
    try:
        with session.begin_nested():
            session.add(cycle)
    except sa.exc.IntegrityError:
        active = session.exec(
            select(Cycle.id, Cycle.state).where(
                Cycle.project_id == project_id,
                col(Cycle.state).not_in([str(s) for s in FINAL_CYCLE_STATES]),
            )
        ).first()
        name = session.exec(select(Project.name).where(Project.id == project_id)).first()
        active_id, active_state = active if active is not None else (None, "unknown")
        raise Conflict(
            f"project {name!r} already has an active cycle (id {active_id}, {active_state}); "
            "wait for it or cancel it"
        ) from None
    return cycle
