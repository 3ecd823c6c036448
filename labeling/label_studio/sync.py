"""Reconciling with Label Studio, which never retries a webhook: every annotation revision we lack
is stored through the inbox, every one Label Studio no longer has is withdrawn."""

import logging
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select

from labeling.label_studio.annotators import pending_annotator_names
from labeling.label_studio.events import (
    SYNC_ACTION,
    event_key,
    ingest_pending,
    reopen_unlabeled_tasks,
)
from labeling.label_studio.gateway import RemoteTask
from labeling.label_studio.link import SOURCE, LabelStudioLink, gateway
from labeling.label_studio.payloads import (
    parse_annotation,
)
from services.config import Settings
from services.db import session_scope
from services.errors import InvalidInput
from services.models import (
    Annotation,
    InboxEvent,
    utcnow,
)
from services.projects import get_project
from services.state import (
    withdraw_annotation,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncReport:
    tasks_seen: int
    new_revisions: int  # annotation revisions found that we had not stored (now ingested)
    withdrawn: int  # our labels whose annotation no longer exists in Label Studio
    rejected: int
    event_ids: list[int]


def sync_annotations(engine: sa.Engine, project_name: str, settings: Settings) -> SyncReport:
    """Make our Label Studio answers equal Label Studio's: every annotation revision we lack is
    stored through the inbox (same checks as a webhook), and every annotation we hold that Label
    Studio no longer has is withdrawn. Catches whatever webhooks missed (our API down, a
    delivery lost: Label Studio does not retry), deletions included, which a "changed since"
    query alone cannot see."""
    started = utcnow()
    with session_scope(engine) as session:
        project = get_project(session, project_name)
        link = LabelStudioLink.of(project)
        project_id = project.id or 0
        stored_revisions = {
            (external_id, updated_at)
            for external_id, updated_at in session.execute(
                sa.select(col(Annotation.external_id), col(Annotation.external_updated_at)).where(
                    col(Annotation.project_id) == project_id, col(Annotation.source) == SOURCE
                )
            )
        }
    remote = gateway(link, settings)
    tasks: list[RemoteTask] = list(remote.list_tasks(link.project_id))
    remote_ids: set[str] = set()
    missing: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for task in tasks:
        for annotation in task.annotations:
            annotation_id = annotation.get("id")
            if not isinstance(annotation_id, int):
                continue
            remote_ids.add(str(annotation_id))
            try:
                parsed = parse_annotation(annotation, task.raw)
            except InvalidInput as error:
                # What Label Studio lists it also keeps: nothing to store, but worth a line.
                log.warning("Label Studio annotation %s not synced: %s", annotation_id, error)
                continue
            if (str(annotation_id), parsed.updated_at) not in stored_revisions:
                missing.append((annotation, task.raw))
    event_ids: list[int] = []
    with session_scope(engine) as session:
        for annotation, task_raw in missing:
            body = {"action": SYNC_ACTION, "annotation": annotation, "task": task_raw}
            event = InboxEvent(
                source=SOURCE,
                event_key=event_key(SYNC_ACTION, body),
                action="ANNOTATION_UPDATED",
                project_id=project_id,
                payload=body,
            )
            try:
                with session.begin_nested():
                    session.add(event)
                event_ids.append(event.id or 0)
            except sa.exc.IntegrityError:
                # The same revision is already in the inbox (a webhook delivered it): process it.
                existing = session.exec(
                    select(InboxEvent.id).where(
                        InboxEvent.source == SOURCE, InboxEvent.event_key == event.event_key
                    )
                ).one()
                event_ids.append(existing or 0)
    rejected = ingest_pending(engine, names=pending_annotator_names(engine, settings)).rejected
    withdrawn = 0
    with session_scope(engine) as session:
        ours = {
            external_id
            for (external_id,) in session.execute(
                sa.select(col(Annotation.external_id))
                .where(
                    col(Annotation.project_id) == project_id,
                    col(Annotation.source) == SOURCE,
                    col(Annotation.withdrawn_at).is_(None),
                    col(Annotation.created_at) < started,
                )
                .distinct()
            )
        }
        for external_id in sorted(ours - remote_ids):
            withdrawn += withdraw_annotation(
                session, project_id=project_id, source=SOURCE, external_id=external_id
            )
        reopen_unlabeled_tasks(session, project_id)
        project = get_project(session, project_name, for_update=True)
        project.labeler = {**project.labeler, "last_sync_at": started.isoformat()}
        session.add(project)
    return SyncReport(
        tasks_seen=len(tasks),
        new_revisions=len(missing),
        withdrawn=withdrawn,
        rejected=rejected,
        event_ids=event_ids,
    )
