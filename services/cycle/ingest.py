"""The ingest stage: stored labeler events (webhooks, simulated answers) become annotations,
each through the labeler whose source they carry. A bad event records its error and the others
go on; an event already processed changes nothing. The answers' projects are then asked whether
their next cycle is due (`trigger.maybe_start_cycle`), so a queue running low is refilled at
once rather than at beat's next tick."""

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from sqlmodel import Session, col, select

from labeling.base import IngestReport
from labeling.registry import answers_later, labeler_of_source
from services.config import Settings
from services.cycle.flow import Stage, Step
from services.cycle.trigger import maybe_start_cycle
from services.db import session_scope
from services.models import InboxEvent, Project, utcnow

log = logging.getLogger(__name__)


def ingest_stage(engine: sa.Engine, settings: Settings, step: Step) -> list[Step]:
    report = ingest_events(engine, step.event_ids)
    log.info("ingested %s", report)
    if not settings.start_due_cycles_at_once:
        return []
    return [Step(Stage.TRAIN, cycle_id) for cycle_id in _start_due(engine, settings, step)]


def _start_due(engine: sa.Engine, settings: Settings, step: Step) -> list[int]:
    """Start the next cycle of each project these events belong to, where one is due and its
    people answer later; the ids of the cycles started. (A labeler answering within the
    hand-off, the simulation's, is driven one cycle at a time by its loop.) A project that
    cannot start one now is left to beat."""
    with session_scope(engine) as session:
        ids = select(InboxEvent.project_id).where(col(InboxEvent.id).in_(list(step.event_ids)))
        projects = session.exec(select(Project).where(col(Project.id).in_(ids))).all()
        names = [project.name for project in projects if answers_later(project)]
    started = []
    for name in sorted(names):
        try:
            cycle = maybe_start_cycle(engine, name, settings)
        except Exception:
            log.exception("project %s: could not start a cycle after ingest; beat will", name)
            continue
        if cycle is not None:
            log.info("project %s: started cycle %s (%s)", name, cycle.id, cycle.trigger)
            started.append(cycle.id or 0)
    return started


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
