"""Answers coming back: webhook bodies stored in the inbox in one statement, then applied in
batches (annotations recorded, review tasks closed, deletions withdrawn); a bad event is
reported on its own and never holds the others back."""

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from labeling.label_studio.link import SOURCE
from labeling.label_studio.payloads import (
    ParsedAnnotation,
    label_studio_id,
    parse_annotation,
)
from services.db import insert_unless_present, lock_for_write, session_scope
from services.errors import FocalloopError, InvalidInput, NotFound
from services.models import (
    Annotation,
    InboxEvent,
    Item,
    ItemStatus,
    LabelTask,
    LabelTaskState,
    Project,
    utcnow,
)
from services.state import (
    AnnotationInput,
    record_annotations,
    tombstoned,
    transition_items,
    withdraw_annotations,
)

log = logging.getLogger(__name__)

# The events we register for; anything else a misconfigured webhook sends is acknowledged and
# ignored (Label Studio disables a webhook that keeps failing).
CREATED_OR_UPDATED = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"})

DELETED = "ANNOTATIONS_DELETED"

SYNC_ACTION = "SYNC"  # an annotation found by sync_annotations rather than delivered by webhook


def event_key(action: str, body: Mapping[str, Any]) -> str:
    """The inbox key of a webhook body: annotation id + updated time for created/updated (so a
    redelivery or a sync of the same revision is one event), the deleted ids for deletions."""
    if action == DELETED:
        ids = sorted(
            int(a["id"]) for a in body.get("annotations") or [] if isinstance(a.get("id"), int)
        )
        return f"deleted:{','.join(map(str, ids))}"[:400]
    annotations = body.get("annotation")
    if isinstance(annotations, Mapping):
        return f"{annotations.get('id')}@{annotations.get('updated_at')}"[:400]
    digest = hashlib.sha256(repr(annotations).encode()).hexdigest()
    return f"bulk:{digest}"


def webhook_project_id(connection: sa.Connection, project_name: str) -> int:
    """The project a webhook URL names; NotFound when there is none."""
    project_id = connection.execute(
        sa.select(col(Project.id)).where(col(Project.name) == project_name)
    ).scalar()
    if project_id is None:
        raise NotFound(f"no project named {project_name!r}")
    return int(project_id)


def store_webhook(
    connection: sa.Connection, project_id: int, body: Mapping[str, Any]
) -> tuple[int | None, str]:
    """Store a Label Studio webhook body in the inbox, in one statement (the webhook answers
    within Label Studio's patience, so no ORM session and, on an autocommit connection, no
    transaction round trips). Returns (event id, outcome) where outcome is stored | duplicate |
    ignored; event id is set only when stored. InvalidInput for a body that is not a Label
    Studio annotation event."""
    action = body.get("action")
    if not isinstance(action, str):
        raise InvalidInput("the webhook body has no 'action'")
    if action not in CREATED_OR_UPDATED and action != DELETED:
        return None, "ignored"
    check_event(action, body)
    values = {
        "source": SOURCE,
        "event_key": event_key(action, body),
        "action": action,
        "project_id": project_id,
        "payload": dict(body),
        "received_at": utcnow(),
        "processed_at": None,
        "error": None,
    }
    # The unique (source, event_key) makes a redelivery insert nothing.
    insert = insert_unless_present(connection.dialect.name, InboxEvent, ["source", "event_key"])
    event_id = connection.execute(insert.values(**values).returning(col(InboxEvent.id))).scalar()
    if event_id is None:
        return None, "duplicate"
    return int(event_id), "stored"


def check_event(action: str, body: Mapping[str, Any]) -> None:
    """InvalidInput when a created/updated/deleted body cannot be applied as it stands: what
    Label Studio itself never sends (an id past 64 bits, a timestamp outside the calendar, a
    result that is not a list of regions). Refusing it at the door keeps it out of the inbox; an
    annotation that merely chose no single label is a person's answer and is stored, to be
    reported at ingest."""
    if action == DELETED:
        deleted = body.get("annotations")
        if not isinstance(deleted, list):
            raise InvalidInput(f"{action} without an 'annotations' list")
        for annotation in deleted:
            if not isinstance(annotation, Mapping) or label_studio_id(annotation.get("id")) is None:
                raise InvalidInput(f"{action} names an annotation without an id in [0, 2**63)")
        return
    raw = body.get("annotation")
    if not isinstance(raw, (Mapping, list)):
        raise InvalidInput(f"{action} without an 'annotation'")
    task = body.get("task")
    if task is not None and not isinstance(task, Mapping):
        raise InvalidInput(f"{action} with a 'task' that is not an object")
    for annotation in raw if isinstance(raw, list) else [raw]:
        if not isinstance(annotation, Mapping):
            raise InvalidInput(f"{action} carries an annotation that is not an object")
        parse_annotation(annotation, task)


@dataclass
class EventOutcome:
    stored: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)


def apply_events(
    session: Session,
    events: Sequence[InboxEvent],
    names: Mapping[int, Mapping[int, str]] | None = None,
) -> dict[int, EventOutcome]:
    """Apply stored Label Studio events in a fixed number of statements. Bad annotations (not
    our task, no single choice, a label outside the label set) are reported in their event's
    outcome and flag their items; they never stop the others. `names`: per project, Label
    Studio user id -> email (`annotators.pending_annotator_names`)."""
    outcomes = {event.id or 0: EventOutcome() for event in events}
    parsed_by_event: list[tuple[int, ParsedAnnotation]] = []
    deletions: dict[int, list[tuple[int, str]]] = {}  # project -> [(event, annotation id)]
    for event in events:
        outcome = outcomes[event.id or 0]
        if event.project_id is None:
            outcome.errors.append("the event names no known project")
            continue
        body = event.payload
        if event.action == DELETED:
            for annotation in body.get("annotations") or []:
                deleted_id = (
                    label_studio_id(annotation.get("id"))
                    if isinstance(annotation, Mapping)
                    else None
                )
                if deleted_id is None:
                    outcome.errors.append("a deleted annotation without an id in [0, 2**63)")
                    continue
                deletions.setdefault(event.project_id, []).append((event.id or 0, str(deleted_id)))
            continue
        raw = body.get("annotation")
        task = body.get("task") if isinstance(body.get("task"), Mapping) else None
        for annotation in raw if isinstance(raw, list) else [raw]:
            if not isinstance(annotation, Mapping):
                outcome.errors.append("an annotation that is not an object")
                continue
            try:
                parsed = parse_annotation(annotation, task, (names or {}).get(event.project_id))
                parsed_by_event.append((event.id or 0, parsed))
            except InvalidInput as error:
                outcome.errors.append(str(error))
    project_of = {event.id or 0: event.project_id for event in events}
    projects = {
        project.id: project
        for project in session.exec(
            select(Project).where(col(Project.id).in_({p for p in project_of.values() if p}))
        ).all()
    }
    tasks: dict[tuple[int, int], LabelTask] = {}
    task_ids = sorted({parsed.task_id for _, parsed in parsed_by_event})
    for start in range(0, len(task_ids), 5000):
        for task in session.exec(
            select(LabelTask).where(
                col(LabelTask.project_id).in_(list(projects)),
                col(LabelTask.external_task_id).in_(task_ids[start : start + 5000]),
            )
        ).all():
            tasks[(task.project_id, int(task.external_task_id or 0))] = task
    answers: list[AnnotationInput] = []
    answered: list[tuple[int, LabelTask]] = []
    flags: dict[int, str] = {}
    for event_id, parsed in parsed_by_event:
        outcome = outcomes[event_id]
        project_id = project_of[event_id]
        project = projects.get(project_id)
        task = tasks.get((project_id or 0, parsed.task_id))
        if project is None or task is None:
            outcome.errors.append(
                f"annotation {parsed.annotation_id}: task {parsed.task_id} is not a focalloop task"
            )
            continue
        problem = parsed.error
        if problem is None and parsed.label is not None and parsed.label not in project.labels:
            problem = (
                f"label {parsed.label!r} is not in the label set {project.labels}; "
                "it was not stored"
            )
        if problem is not None:
            reason = f"Label Studio annotation {parsed.annotation_id}: {problem}"
            flags[task.item_id] = reason[:1000]
            outcome.errors.append(reason)
            continue
        answers.append(
            AnnotationInput(
                item_id=task.item_id,
                label=parsed.label,
                source=SOURCE,
                external_id=str(parsed.annotation_id),
                updated_at=parsed.updated_at,
                annotator=parsed.annotator,
                cancelled=parsed.cancelled,
            )
        )
        answered.append((event_id, task))
    rows = record_annotations(session, answers)
    accepted: set[int] = set()
    reviews_answered: set[int] = set()
    labels_answered: set[int] = set()
    for (event_id, task), row in zip(answered, rows, strict=True):
        if row is None:
            outcomes[event_id].duplicates += 1
            continue
        outcomes[event_id].stored += 1
        accepted.add(task.item_id)
        if task.kind == "review":
            reviews_answered.add(task.id or 0)
        elif not row.cancelled:
            # Label Studio counts the task finished; a skip leaves it open there (its
            # skip_queue, REQUEUE_FOR_OTHERS, serves it to another annotator), and here.
            labels_answered.add(task.id or 0)
    now = utcnow()
    if flags:
        session.execute(
            sa.update(Item),
            [
                {"id": item_id, "label_issue": reason, "updated_at": now}
                for item_id, reason in flags.items()
            ],
        )
    if accepted:
        session.execute(
            sa.update(Item)
            .where(col(Item.id).in_(sorted(accepted)), col(Item.label_issue).is_not(None))
            .values(label_issue=None)
            .execution_options(synchronize_session=False)
        )
    if labels_answered:
        session.execute(
            sa.update(LabelTask)
            .where(
                col(LabelTask.id).in_(sorted(labels_answered)),
                col(LabelTask.state) == LabelTaskState.OPEN,
            )
            .values(state=LabelTaskState.ANSWERED, updated_at=now)
            .execution_options(synchronize_session=False)
        )
    if reviews_answered:
        session.execute(
            sa.update(LabelTask)
            .where(col(LabelTask.id).in_(sorted(reviews_answered)))
            .values(state=LabelTaskState.ANSWERED, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        # A skipped review keeps the label as it was: the item leaves review either way.
        still_in_review = session.exec(
            select(Item.id)
            .join(LabelTask, col(LabelTask.item_id) == col(Item.id))
            .where(
                col(LabelTask.id).in_(sorted(reviews_answered)),
                col(Item.status) == ItemStatus.IN_REVIEW,
            )
        ).all()
        if still_in_review:
            transition_items(
                session,
                [int(i or 0) for i in still_in_review],
                ItemStatus.LABELED,
                expected=ItemStatus.IN_REVIEW,
            )
    for project_id, pairs in deletions.items():
        withdrawn_before = {
            external_id
            for (external_id,) in session.execute(
                sa.select(col(Annotation.external_id)).where(
                    col(Annotation.project_id) == project_id,
                    col(Annotation.source) == SOURCE,
                    col(Annotation.external_id).in_([a for _, a in pairs]),
                    col(Annotation.withdrawn_at).is_(None),
                )
            )
        }
        # A delete that arrives before its annotation leaves a tombstone: news too.
        already = tombstoned(session, [project_id], [a for _, a in pairs])
        new = withdrawn_before | {a for _, a in pairs if (project_id, SOURCE, a) not in already}
        withdraw_annotations(
            session,
            project_id=project_id,
            source=SOURCE,
            external_ids=[a for _, a in pairs],
        )
        reopen_unlabeled_tasks(session, project_id)
        for event_id, annotation_id in pairs:
            if annotation_id in new:
                outcomes[event_id].stored += 1
                new.discard(annotation_id)
            else:
                outcomes[event_id].duplicates += 1
    session.flush()
    return outcomes


def reopen_unlabeled_tasks(session: Session, project_id: int) -> int:
    """Label tasks marked answered whose item lost its label (its annotation was deleted in
    Label Studio, which then serves the task again) are open again. Returns how many."""
    result = session.execute(
        sa.update(LabelTask)
        .where(
            col(LabelTask.project_id) == project_id,
            col(LabelTask.kind) == "label",
            col(LabelTask.state) == LabelTaskState.ANSWERED,
            col(LabelTask.item_id).in_(
                sa.select(col(Item.id)).where(
                    col(Item.project_id) == project_id, col(Item.status) == ItemStatus.UNLABELED
                )
            ),
        )
        .values(state=LabelTaskState.OPEN, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


@dataclass
class IngestTotals:
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    events: int = 0


INGEST_BATCH = 500

INGEST_MAX_BATCHES = 40  # per call, so one task cannot hold a worker forever under load


def _mark(event: InboxEvent, outcome: EventOutcome, totals: IngestTotals) -> None:
    totals.stored += outcome.stored
    totals.duplicates += outcome.duplicates
    totals.events += 1
    if outcome.errors:
        event.error = "; ".join(outcome.errors)[:4000]
        totals.rejected += 1
    event.processed_at = utcnow()


def _apply_alone(
    session: Session, event: InboxEvent, names: Mapping[int, Mapping[int, str]] | None
) -> EventOutcome:
    try:
        with session.begin_nested():
            return apply_events(session, [event], names)[event.id or 0]
    except sa.exc.OperationalError:
        raise
    except Exception as error:
        log.warning("inbox event %s quarantined", event.id, exc_info=True)
        reason = str(error)
        if not isinstance(error, FocalloopError):
            reason = f"{type(error).__name__}: {reason}"
        return EventOutcome(errors=[f"could not be applied: {reason}"[:1000]])


def ingest_pending(
    engine: sa.Engine,
    *,
    batch: int = INGEST_BATCH,
    names: Mapping[int, Mapping[int, str]] | None = None,
) -> IngestTotals:
    """Apply every unprocessed Label Studio event, oldest first, in batches of `batch` per
    transaction. Concurrent callers take disjoint batches (`FOR UPDATE SKIP LOCKED` on
    PostgreSQL); a batch that fails as a whole is retried one event per savepoint, so one bad
    event cannot hold the others back. This is what every `ingest` task runs: under load the
    first task takes many events at once and the later ones find theirs done. `names`: see
    `apply_events`."""
    totals = IngestTotals()
    for _ in range(INGEST_MAX_BATCHES):
        with session_scope(engine) as session:
            lock_for_write(session)  # SQLite: one ingest at a time, as SKIP LOCKED gives PG
            events = list(
                session.exec(
                    select(InboxEvent)
                    .where(InboxEvent.source == SOURCE, col(InboxEvent.processed_at).is_(None))
                    .order_by(col(InboxEvent.id))
                    .limit(batch)
                    .with_for_update(skip_locked=True)
                ).all()
            )
            if not events:
                return totals
            try:
                with session.begin_nested():
                    outcomes = apply_events(session, events, names)
            except sa.exc.OperationalError:
                raise  # the database is away: nothing is poison, the task retries
            except Exception:
                # Anything else is some event's fault: find it by applying one at a time, and
                # quarantine it with its reason so it never blocks the others again.
                log.warning("a batch of %d events failed; applying one by one", len(events))
                outcomes = {event.id or 0: _apply_alone(session, event, names) for event in events}
            for event in events:
                _mark(event, outcomes[event.id or 0], totals)
                session.add(event)
    return totals
