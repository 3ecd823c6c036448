"""The ingest stage: stored labeler events (webhooks, simulated answers) become annotations,
each through the labeler whose source they carry. A bad event records its error and the others
go on; an event already processed changes nothing."""

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from sqlmodel import Session, col, select

from labeling.base import IngestReport
from labeling.registry import labeler_of_source
from services.config import Settings
from services.cycle.flow import Step
from services.db import session_scope
from services.models import InboxEvent, utcnow

log = logging.getLogger(__name__)


def ingest_stage(engine: sa.Engine, settings: Settings, step: Step) -> list[Step]:
    report = ingest_events(engine, step.event_ids)
    log.info("ingested %s", report)
    return []


def ingest_events(engine: sa.Engine, event_ids: Sequence[int]) -> IngestReport:
    """Apply these inbox events, grouped by source, each group by its labeler."""
    with session_scope(engine) as session:
        sources = dict(
            session.execute(
                sa.select(col(InboxEvent.id), col(InboxEvent.source)).where(
                    col(InboxEvent.id).in_(list(event_ids))
                )
            ).all()
        )
    report = IngestReport(duplicates=len(set(event_ids) - set(sources)))
    for source in sorted(set(sources.values())):
        ids = [event_id for event_id, of in sources.items() if of == source]
        labeler = labeler_of_source(source)
        if labeler is None:
            report = report + _refuse(engine, ids, f"no labeler takes events from {source!r}")
            continue
        report = report + labeler.ingest(engine, ids)
    return report


def _refuse(engine: sa.Engine, event_ids: list[int], reason: str) -> IngestReport:
    """Mark events no labeler can apply as processed with the reason (never left to block)."""
    with session_scope(engine) as session:
        session.execute(
            sa.update(InboxEvent)
            .where(col(InboxEvent.id).in_(event_ids), col(InboxEvent.processed_at).is_(None))
            .values(processed_at=utcnow(), error=reason)
        )
    return IngestReport(rejected=len(event_ids))


def pending_events(session: Session, *, limit: int = 10_000) -> list[int]:
    """Inbox events not processed yet, oldest first (what a lost ingest message left behind)."""
    return list(
        session.exec(
            select(InboxEvent.id)
            .where(col(InboxEvent.processed_at).is_(None))
            .order_by(col(InboxEvent.id))
            .limit(limit)
        ).all()  # type: ignore[arg-type]
    )
