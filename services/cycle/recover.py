"""Beat's janitor: find work whose worker died or whose message was lost, and say what to run
again; every stage's claim makes a duplicate harmless. Cycles past their deadline fail."""

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, select

from services.config import Settings
from services.cycle.flow import Stage, Step
from services.cycle.ingest import pending_events
from services.cycle.leases import fail_chunk, fail_cycle
from services.db import session_scope
from services.models import FINAL_CYCLE_STATES, ChunkState, Cycle, CycleState, ScoreChunk, utcnow


@dataclass
class Recovery:
    """What recover_stalled decided: chunks and trainings to enqueue again, cycles failed,
    selections and hand-offs to resume, inbox events to ingest."""

    chunk_ids: list[int] = field(default_factory=list)
    train_cycle_ids: list[int] = field(default_factory=list)
    select_cycle_ids: list[int] = field(default_factory=list)
    hand_off_cycle_ids: list[int] = field(default_factory=list)
    failed_cycle_ids: list[int] = field(default_factory=list)
    event_ids: list[int] = field(default_factory=list)

    def steps(self) -> list[Step]:
        """The steps to run (or enqueue) again."""
        return [
            *(Step(Stage.TRAIN, cycle_id) for cycle_id in self.train_cycle_ids),
            *(Step(Stage.SCORE, chunk_id) for chunk_id in self.chunk_ids),
            *(Step(Stage.SELECT, cycle_id) for cycle_id in self.select_cycle_ids),
            *(Step(Stage.HAND_OFF, cycle_id) for cycle_id in self.hand_off_cycle_ids),
            *([Step(Stage.INGEST, event_ids=tuple(self.event_ids))] if self.event_ids else []),
        ]


def recover_stalled(
    engine: sa.Engine,
    settings: Settings,
    *,
    now: datetime | None = None,
    stale_s: float | None = None,
) -> Recovery:
    """Find work whose worker died or whose message was lost, and say what to enqueue again.

    Running chunks and trainings with an expired lease are re-enqueued (their next claim counts
    an attempt; past the limit the cycle fails with the reason). Pending chunks, pending or
    selecting / handing-off cycles untouched for `stale_s` (default: one lease) are re-enqueued
    too, since a broker restart can lose their message; their claims make duplicates harmless.
    Cycles past their deadline fail.
    """
    now = now or utcnow()
    stale_before = now - timedelta(seconds=stale_s if stale_s is not None else settings.lease_s)
    recovery = Recovery()
    with session_scope(engine) as session:
        for cycle in session.exec(
            select(Cycle).where(col(Cycle.state).not_in([str(s) for s in FINAL_CYCLE_STATES]))
        ).all():
            cycle_id = cycle.id or 0
            if cycle.deadline_at is not None and cycle.deadline_at < now:
                fail_cycle(session, cycle_id, "deadline passed: the cycle ran too long")
                recovery.failed_cycle_ids.append(cycle_id)
                continue
            state = CycleState(cycle.state)
            if (
                state == CycleState.TRAINING
                and (cycle.lease_expires_at is not None and cycle.lease_expires_at < now)
            ) or (state == CycleState.PENDING and cycle.updated_at < stale_before):
                recovery.train_cycle_ids.append(cycle_id)
            elif state == CycleState.SELECTING and cycle.updated_at < stale_before:
                recovery.select_cycle_ids.append(cycle_id)
            elif state == CycleState.HANDING_OFF and cycle.updated_at < stale_before:
                recovery.hand_off_cycle_ids.append(cycle_id)
            elif state == CycleState.SCORING:
                _stalled_chunks(session, cycle_id, now, stale_before, settings, recovery)
        recovery.event_ids = pending_events(session)
    return recovery


def _stalled_chunks(
    session: Session,
    cycle_id: int,
    now: datetime,
    stale_before: datetime,
    settings: Settings,
    recovery: Recovery,
) -> None:
    """A scoring cycle's chunks whose lease expired (or whose message was lost) go back on
    `recovery`; one that has had every attempt fails, and the cycle with it."""
    for chunk in session.exec(
        select(ScoreChunk).where(
            ScoreChunk.cycle_id == cycle_id,
            col(ScoreChunk.state).in_([ChunkState.PENDING, ChunkState.RUNNING]),
        )
    ).all():
        expired = (
            chunk.state == ChunkState.RUNNING
            and chunk.lease_expires_at is not None
            and chunk.lease_expires_at < now
        )
        lost = chunk.state == ChunkState.PENDING and chunk.updated_at < stale_before
        if expired and chunk.attempts >= settings.max_chunk_attempts:
            fail_chunk(
                session, chunk, f"gave up after {chunk.attempts} attempts (lease expired each time)"
            )
            recovery.failed_cycle_ids.append(cycle_id)
            return
        if expired or lost:
            recovery.chunk_ids.append(chunk.id or 0)
