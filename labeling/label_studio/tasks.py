"""Label Studio tasks as rows first: a `LabelTask` is written pending before Label Studio is asked
to create the task, and confirmed (open, with Label Studio's id) after; anything that died in
between is reconciled by item id before the next import, so no item ever gets a second task."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from labeling.label_studio.gateway import LabelStudioGateway
from labeling.label_studio.link import LabelStudioLink, gateway
from labeling.label_studio.media import media_url
from labeling.label_studio.payloads import (
    TaskSpec,
    feature_row,
    task_payload,
)
from services.config import Settings
from services.datasets.pool import load_shard
from services.datasets.store import open_store
from services.db import session_scope
from services.models import (
    Item,
    ItemStatus,
    LabelTask,
    LabelTaskState,
    Project,
    utcnow,
)
from services.projects import get_project
from services.state import (
    move_items_still_in,
)


@dataclass
class PushReport:
    created: int = 0
    adopted: int = 0  # found already in Label Studio (an earlier attempt's import went through)
    predictions_refreshed: int = 0
    in_flight: int = 0  # 1 when another pusher's batch was still unconfirmed (left to it)


def pending_tasks(
    session: Session, project_id: int, *, limit: int | None = None, attempted: bool | None = None
) -> list[LabelTask]:
    """The project's tasks not confirmed by Label Studio yet, oldest first; `attempted` True
    keeps only those already sent once (their fate is unknown), False only those never sent."""
    statement = select(LabelTask).where(
        LabelTask.project_id == project_id, LabelTask.state == LabelTaskState.PENDING
    )
    if attempted is True:
        statement = statement.where(col(LabelTask.attempted_at).is_not(None))
    elif attempted is False:
        statement = statement.where(col(LabelTask.attempted_at).is_(None))
    statement = statement.order_by(col(LabelTask.id))
    if limit is not None:
        statement = statement.limit(limit)
    return list(session.exec(statement).all())


def _feature_rows(
    project: Project, items: Sequence[Item], settings: Settings
) -> dict[int, dict[str, str]]:
    store = open_store(project.store_url, settings)
    rows: dict[int, dict[str, str]] = {}
    by_shard: dict[str, list[Item]] = {}
    for item in items:
        if item.shard_key is not None:
            by_shard.setdefault(item.shard_key, []).append(item)
    for key, members in by_shard.items():
        shard = load_shard(store, key)
        for item in members:
            rows[item.id or 0] = feature_row(shard.data[int(item.shard_row or 0)].tolist())
    return rows


def task_payloads(
    session: Session, project: Project, rows: Sequence[LabelTask], settings: Settings
) -> list[dict[str, Any]]:
    link = LabelStudioLink.of(project)
    items = {
        item.id: item
        for item in session.exec(
            select(Item).where(col(Item.id).in_([row.item_id for row in rows]))
        ).all()
    }
    features = (
        _feature_rows(project, list(items.values()), settings)
        if project.modality == "features"
        else {}
    )
    payloads = []
    for row in rows:
        item = items[row.item_id]
        media: str | Mapping[str, str] = (
            features[row.item_id]
            if project.modality == "features"
            else media_url(project, item, link, settings)
        )
        prediction = (
            (row.prediction_label, float(row.prediction_score))
            if row.prediction_label is not None and row.prediction_score is not None
            else None
        )
        payloads.append(
            task_payload(
                TaskSpec(
                    item_id=row.item_id,
                    external_id=item.external_id,
                    kind="review" if row.kind == "review" else "label",
                    media=media,
                    note=row.note,
                    prediction=prediction,
                    model_version=row.model_version,
                ),
                project.modality,
            )
        )
    return payloads


def _confirm(session: Session, row_ids: Sequence[int], task_ids: Sequence[int]) -> None:
    """Record Label Studio's ids and move the items on: label -> queued (from selected),
    review -> in_review (from labeled). An item that moved meanwhile (an answer arrived first)
    keeps its status. A fixed number of statements per batch."""
    now = utcnow()
    session.execute(
        sa.update(LabelTask),
        [
            {
                "id": row_id,
                "external_task_id": task_id,
                "state": LabelTaskState.OPEN,
                "updated_at": now,
            }
            for row_id, task_id in zip(row_ids, task_ids, strict=True)
        ],
    )
    kinds = dict(
        session.execute(
            sa.select(col(LabelTask.item_id), col(LabelTask.kind)).where(
                col(LabelTask.id).in_(list(row_ids))
            )
        ).all()
    )
    label_items = [item_id for item_id, kind in kinds.items() if kind == "label"]
    review_items = [item_id for item_id, kind in kinds.items() if kind == "review"]
    move_items_still_in(session, label_items, ItemStatus.QUEUED, expected=ItemStatus.SELECTED)
    move_items_still_in(session, review_items, ItemStatus.IN_REVIEW, expected=ItemStatus.LABELED)


def _in_flight_cutoff(settings: Settings) -> datetime:
    """Rows sent after this may still be confirmed by the pusher that sent them (it waits at
    most the request timeout); only rows sent before it are another pusher's to reconcile."""
    return utcnow() - timedelta(seconds=settings.label_studio_timeout_s + 30)


def _reconcile(
    engine: sa.Engine,
    project_id: int,
    remote: LabelStudioGateway,
    link: LabelStudioLink,
    settings: Settings,
) -> int:
    """Pending rows that were sent once and never confirmed (their pusher died, or its request
    timed out) may exist in Label Studio: adopt every task found for their (item, kind). Returns
    how many were adopted."""
    cutoff = _in_flight_cutoff(settings)
    with session_scope(engine) as session:
        uncertain = [
            row
            for row in pending_tasks(session, project_id, attempted=True)
            if row.attempted_at is not None and row.attempted_at < cutoff
        ]
        if not uncertain:
            return 0
        known = set(
            session.exec(
                select(LabelTask.external_task_id).where(
                    LabelTask.project_id == project_id,
                    col(LabelTask.external_task_id).is_not(None),
                )
            ).all()
        )
        wanted = {(row.item_id, row.kind): row for row in uncertain}
    found: dict[int, int] = {}
    for task in remote.list_tasks(link.project_id):
        key = (task.item_id or -1, task.kind)
        if key in wanted and task.task_id not in known:
            found.setdefault(wanted[key].id or 0, task.task_id)
    if found:
        with session_scope(engine) as session:
            _confirm(session, list(found), list(found.values()))
    return len(found)


def push_pending(engine: sa.Engine, project_name: str, settings: Settings) -> PushReport:
    """Create every pending task of the project in Label Studio, in batches, each batch
    confirmed in the database before the next is sent."""
    report = PushReport()
    with session_scope(engine) as session:
        project = get_project(session, project_name)
        link = LabelStudioLink.of(project)
        project_id = project.id or 0
    remote = gateway(link, settings)
    report.adopted = _reconcile(engine, project_id, remote, link, settings)
    batch = settings.label_studio_import_batch
    while True:
        with session_scope(engine) as session:
            # The project row lock makes concurrent pushers (a hand-off and `labelstudio push`)
            # take turns choosing and marking rows.
            project = get_project(session, project_name, for_update=True)
            rows = pending_tasks(session, project_id, limit=batch)
            if not rows:
                return report
            cutoff = _in_flight_cutoff(settings)
            if any(row.attempted_at and row.attempted_at >= cutoff for row in rows):
                # Another pusher sent these moments ago and will confirm them: leave them.
                report.in_flight += 1
                return report
            if any(row.attempted_at for row in rows):
                # Sent before and never confirmed: only a reconcile may decide (never re-import).
                continue_after_reconcile = True
            else:
                continue_after_reconcile = False
                payloads = task_payloads(session, project, rows, settings)
                now = utcnow()
                for row in rows:
                    row.attempted_at = now
                    session.add(row)
            row_ids = [row.id or 0 for row in rows]
        if continue_after_reconcile:
            adopted = _reconcile(engine, project_id, remote, link, settings)
            report.adopted += adopted
            if adopted == 0:
                # Label Studio has none of them: the earlier import never arrived. Clear the
                # mark so they are sent.
                with session_scope(engine) as session:
                    session.execute(
                        sa.update(LabelTask)
                        .where(
                            col(LabelTask.id).in_(row_ids),
                            col(LabelTask.state) == LabelTaskState.PENDING,
                        )
                        .values(attempted_at=None)
                    )
            continue
        task_ids = remote.import_tasks(link.project_id, payloads)
        with session_scope(engine) as session:
            _confirm(session, row_ids, task_ids)
        report.created += len(task_ids)


def drop_unsent_tasks(session: Session, cycle_id: int) -> int:
    """Delete the cycle's label tasks that were never sent (its hand-off failed for good)."""
    result = session.execute(
        sa.delete(LabelTask)
        .where(
            col(LabelTask.cycle_id) == cycle_id,
            col(LabelTask.kind) == "label",
            col(LabelTask.state) == LabelTaskState.PENDING,
            col(LabelTask.attempted_at).is_(None),
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
