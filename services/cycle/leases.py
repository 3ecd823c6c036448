"""How stages take work and how a cycle ends early: leases with attempt numbers (the fencing
tokens that make a redelivered message or a worker whose lease was taken over change nothing),
lease renewal during long work, cancel checkpoints, and failing a chunk or a cycle with its
reason (a failed or cancelled cycle's selection goes back to the pool).
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import sqlalchemy as sa
from sqlmodel import Session, col

from services.config import Settings
from services.db import session_scope
from services.errors import NotFound
from services.models import (
    FINAL_CYCLE_STATES,
    ChunkState,
    Cycle,
    CycleSelection,
    CycleState,
    Item,
    ItemStatus,
    ScoreChunk,
    utcnow,
)
from services.state import transition_cycle, transition_items


@contextmanager
def lease_renewal(renew: Callable[[], bool], every_s: float) -> Iterator[threading.Event]:
    """Call `renew` every `every_s` seconds in a background thread while the block runs. The
    yielded event is set when a renewal reports the lease lost (the work should be abandoned)."""
    stop = threading.Event()
    lost = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            if not renew():
                lost.set()
                return

    thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()


def cancel_if_requested(session: Session, cycle: Cycle) -> bool:
    """Move a cycle whose cancel was requested to cancelled; True if it was."""
    if not cycle.cancel_requested or cycle.state in FINAL_CYCLE_STATES:
        return False
    release_selection(session, cycle.id or 0)
    transition_cycle(session, cycle.id or 0, CycleState.CANCELLED)
    return True


def release_selection(session: Session, cycle_id: int) -> None:
    """Items a cancelled or failed cycle selected but never handed off go back to unlabeled."""
    ids = [
        item_id
        for (item_id,) in session.execute(
            sa.select(col(CycleSelection.item_id))
            .join(Item, col(Item.id) == col(CycleSelection.item_id))
            .where(
                col(CycleSelection.cycle_id) == cycle_id,
                col(Item.status) == ItemStatus.SELECTED,
            )
        )
    ]
    transition_items(session, ids, ItemStatus.UNLABELED, expected=ItemStatus.SELECTED)


def fail_cycle(session: Session, cycle_id: int, reason: str) -> None:
    """Fail a cycle (if it is not final yet), releasing any selection it made."""
    cycle = session.get(Cycle, cycle_id)
    if cycle is None or cycle.state in FINAL_CYCLE_STATES:
        return
    release_selection(session, cycle_id)
    transition_cycle(session, cycle_id, CycleState.FAILED, reason=reason[:4000])


def claim_training(session: Session, cycle_id: int, settings: Settings) -> int | None:
    """Take the training lease: pending -> training, or re-take an expired one. Returns the
    attempt number (the fencing token), or None when the cycle is not ours to train."""
    now = utcnow()
    cycle = session.get(Cycle, cycle_id)
    if cycle is None or cycle.state not in (CycleState.PENDING, CycleState.TRAINING):
        return None
    if cycle.state == CycleState.PENDING:
        transition_cycle(session, cycle_id, CycleState.TRAINING)
    result = session.execute(
        sa.update(Cycle)
        .where(
            col(Cycle.id) == cycle_id,
            col(Cycle.state) == CycleState.TRAINING,
            col(Cycle.train_attempts) == cycle.train_attempts,
            sa.or_(col(Cycle.lease_expires_at).is_(None), col(Cycle.lease_expires_at) < now),
        )
        .values(
            train_attempts=Cycle.train_attempts + 1,
            lease_expires_at=now + timedelta(seconds=settings.lease_s),
            progress=None,  # the previous attempt's epochs are not this one's
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    session.refresh(cycle)
    return cycle.train_attempts


def renew_training_lease(
    engine: sa.Engine, cycle_id: int, attempt: int, settings: Settings
) -> bool:
    with session_scope(engine) as session:
        result = session.execute(
            sa.update(Cycle)
            .where(
                col(Cycle.id) == cycle_id,
                col(Cycle.state) == CycleState.TRAINING,
                col(Cycle.train_attempts) == attempt,
            )
            .values(lease_expires_at=utcnow() + timedelta(seconds=settings.lease_s))
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def claim_chunk(session: Session, chunk_id: int, worker: str, settings: Settings) -> int | None:
    now = utcnow()
    chunk = session.get(ScoreChunk, chunk_id)
    if chunk is None:
        raise NotFound(f"no score chunk with id {chunk_id}")
    result = session.execute(
        sa.update(ScoreChunk)
        .where(
            col(ScoreChunk.id) == chunk_id,
            col(ScoreChunk.attempts) == chunk.attempts,
            sa.or_(
                col(ScoreChunk.state) == ChunkState.PENDING,
                sa.and_(
                    col(ScoreChunk.state) == ChunkState.RUNNING,
                    col(ScoreChunk.lease_expires_at) < now,
                ),
            ),
        )
        .values(
            state=ChunkState.RUNNING,
            attempts=ScoreChunk.attempts + 1,
            lease_expires_at=now + timedelta(seconds=settings.lease_s),
            worker=worker[:200],
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    session.refresh(chunk)
    return chunk.attempts


def fail_chunk(session: Session, chunk: ScoreChunk, reason: str) -> None:
    chunk.state = ChunkState.FAILED
    chunk.error = reason[:4000]
    chunk.lease_expires_at = None
    session.add(chunk)
    session.flush()
    fail_cycle(session, chunk.cycle_id, f"score chunk {chunk.index} failed: {reason}"[:4000])


def release_chunk(
    session: Session, chunk_id: int, attempt: int, reason: str, settings: Settings
) -> bool:
    """After a failed attempt: back to pending for a retry (True), or, on the last attempt,
    fail the chunk and its cycle with the reason (False). Fenced by the attempt number."""
    chunk = session.get(ScoreChunk, chunk_id)
    if chunk is None or chunk.state != ChunkState.RUNNING or chunk.attempts != attempt:
        return False
    if attempt >= settings.max_chunk_attempts:
        fail_chunk(session, chunk, f"failed {attempt} times; last error: {reason}")
        return False
    chunk.state = ChunkState.PENDING
    chunk.error = reason[:4000]
    chunk.lease_expires_at = None
    chunk.updated_at = utcnow()
    session.add(chunk)
    return True
