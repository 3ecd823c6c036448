"""Status changes and annotations: the only code that writes `Item.status`, `Item.label` or
`Cycle.state`.

Every status change is a conditional UPDATE (`... WHERE status = <the status we read>`): if
another writer moved the row first, the update matches nothing and `Conflict` is raised instead
of silently overwriting its change. Illegal changes raise `IllegalTransition`.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col, select

from services.errors import Conflict, IllegalTransition, InvalidInput, NotFound
from services.models import (
    CYCLE_TRANSITIONS,
    FINAL_CYCLE_STATES,
    ITEM_TRANSITIONS,
    Annotation,
    Cycle,
    CycleState,
    Item,
    ItemStatus,
    Project,
    utcnow,
)


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
    session.expire_all()
    return moved


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
    item = _load_item(session, answer.item_id)
    project = session.get(Project, item.project_id)
    assert project is not None
    if answer.cancelled:
        if answer.label is not None:
            raise InvalidInput("a cancelled answer carries no label")
    elif answer.label not in project.labels:
        raise InvalidInput(
            f"label {answer.label!r} is not in project {project.name!r}'s label set "
            f"{project.labels}; the answer was not stored"
        )
    if item.status == ItemStatus.UNREADABLE:
        raise IllegalTransition(
            kind="item", row_id=answer.item_id, current=item.status, requested=ItemStatus.LABELED
        )
    if answer.updated_at.tzinfo is None:
        raise InvalidInput("annotation times must be timezone-aware")
    duplicate = session.exec(
        select(Annotation.id).where(
            Annotation.project_id == item.project_id,
            Annotation.source == answer.source,
            Annotation.external_id == answer.external_id,
            Annotation.external_updated_at == answer.updated_at,
        )
    ).first()
    if duplicate is not None:
        return None
    row = Annotation(
        project_id=item.project_id,
        item_id=answer.item_id,
        label=answer.label,
        cancelled=answer.cancelled,
        source=answer.source,
        external_id=answer.external_id,
        external_updated_at=answer.updated_at,
        annotator=answer.annotator,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except sa.exc.IntegrityError:
        return None  # a concurrent delivery of the same revision won the insert
    refresh_label(session, item)
    return row


def withdraw_annotation(session: Session, *, project_id: int, source: str, external_id: str) -> int:
    """Mark every revision of an external annotation withdrawn (its label stops counting) and
    refresh the items' labels. Returns the revisions newly withdrawn (0 on a repeat)."""
    rows = session.exec(
        select(Annotation).where(
            Annotation.project_id == project_id,
            Annotation.source == source,
            Annotation.external_id == external_id,
            col(Annotation.withdrawn_at).is_(None),
        )
    ).all()
    now = utcnow()
    for row in rows:
        row.withdrawn_at = now
        session.add(row)
    session.flush()
    for item_id in {row.item_id for row in rows}:
        refresh_label(session, _load_item(session, item_id))
    return len(rows)


def live_answers(session: Session, item_id: int) -> list[Annotation]:
    """The newest revision of each annotation of an item, withdrawn ones left out, oldest
    first."""
    rows = session.exec(
        select(Annotation)
        .where(Annotation.item_id == item_id, col(Annotation.withdrawn_at).is_(None))
        .order_by(col(Annotation.external_updated_at), col(Annotation.id))
    ).all()
    newest: dict[tuple[str, str], Annotation] = {}
    for row in rows:
        newest[(row.source, row.external_id)] = row
    return sorted(newest.values(), key=lambda r: (r.external_updated_at, r.id or 0))


def refresh_label(session: Session, item: Item) -> Item:
    """Derive an item's label from its annotations: the newest live, non-cancelled answer.

    Also records how many annotators have a live answer and whether they disagree. Status
    follows: an item with a label becomes labeled; one whose labels were all withdrawn returns
    to unlabeled; cancelled answers alone change nothing.
    """
    answers = [row for row in live_answers(session, item.id or 0) if not row.cancelled]
    per_annotator: dict[str, str] = {}
    for row in answers:
        assert row.label is not None
        per_annotator[row.annotator] = row.label  # later rows are newer
    current = answers[-1] if answers else None
    status = ItemStatus(item.status)
    if current is not None and status != ItemStatus.LABELED:
        transition_item(session, item.id or 0, ItemStatus.LABELED)
    elif current is None and status in (ItemStatus.LABELED, ItemStatus.IN_REVIEW):
        transition_item(session, item.id or 0, ItemStatus.UNLABELED, reason="label withdrawn")
    session.refresh(item)
    item.label = current.label if current else None
    item.label_source = current.source if current else None
    item.annotator = current.annotator if current else None
    item.labeled_at = current.external_updated_at if current else None
    item.n_annotators = len(per_annotator)
    item.disagreement = len(set(per_annotator.values())) > 1
    item.updated_at = utcnow()
    session.add(item)
    session.flush()
    return item


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
    return cycle


def create_cycle(session: Session, *, project_id: int, trigger: str) -> Cycle:
    """A new pending cycle. The database's partial unique index allows one non-final cycle per
    project, so two concurrent starts cannot both succeed: the loser gets Conflict."""
    now = utcnow()
    cycle = Cycle(
        project_id=project_id,
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
            select(Cycle.id).where(
                Cycle.project_id == project_id,
                col(Cycle.state).not_in([str(s) for s in FINAL_CYCLE_STATES]),
            )
        ).first()
        raise Conflict(
            f"project {project_id} already has an active cycle (id {active}); "
            "wait for it or cancel it"
        ) from None
    return cycle
