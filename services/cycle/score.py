"""The score stage: one chunk (one pool shard) of a scoring cycle. Claim the chunk's lease
(attempt + 1), score its unlabeled and queued items with the cycle's model, write per-item
scores and the chunk's candidates to the store, and mark it done; the chunk whose completion
makes the count reach the total moves the cycle to selection, in the same transaction, so
exactly one chunk says "select next" (no chord, no result backend).

A failed attempt is released for Celery to retry (`TransientError`) until the attempt limit,
then the chunk and the cycle fail with the last error; `DeviceUnavailable` (an unavailable
device) fails them at once.
"""

import os
import socket
import time
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlmodel import col, select

from services import logs
from services.artifacts import load_model, predict
from services.config import Settings
from services.cycle.data import SCORED_STATUSES, project_store
from services.cycle.decide import chunk_picks
from services.cycle.flow import Stage, Step
from services.cycle.leases import cancel_if_requested, claim_chunk, fail_chunk, release_chunk
from services.cycle.seeds import Purpose, derive_seed
from services.cycle.tables import candidates_to_table, parquet_bytes, per_item_scores
from services.datasets.pool import load_shard
from services.datasets.store import safe_key, sha256_hex
from services.db import session_scope
from services.errors import DeviceUnavailable, TransientError
from services.ml.checkpoint import Checkpoint
from services.models import (
    ChunkState,
    Cycle,
    CycleState,
    Item,
    ItemStatus,
    ModelVersion,
    Project,
    ScoreChunk,
    utcnow,
)
from services.recipe import scalar_gamma
from services.selection.config import SelectionConfig
from services.selection.strategies import make_strategy
from services.state import transition_cycle


def score_stage(engine: sa.Engine, settings: Settings, step: Step) -> list[Step]:
    chunk_id = step.target
    with session_scope(engine) as session:
        attempt = claim_chunk(session, chunk_id, _worker(), settings)
        if attempt is None:
            return []  # done, or another worker holds a live lease
        chunk = session.get(ScoreChunk, chunk_id)
        assert chunk is not None
        cycle = session.get(Cycle, chunk.cycle_id)
        assert cycle is not None
        if cancel_if_requested(session, cycle) or cycle.state != CycleState.SCORING:
            return []
        if attempt > settings.max_chunk_attempts:
            fail_chunk(session, chunk, f"gave up after {settings.max_chunk_attempts} attempts")
            return []
    try:
        work = _read(engine, chunk_id, settings)
        keys = _score(work, settings) if work.rows else None
    except DeviceUnavailable as error:
        # This process cannot score anywhere it was told to: fail now, with the reason, rather
        # than after every attempt.
        with session_scope(engine) as session:
            chunk = session.get(ScoreChunk, chunk_id)
            assert chunk is not None
            fail_chunk(session, chunk, f"{type(error).__name__}: {error}")
        return []
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        with session_scope(engine) as session:
            retry = release_chunk(session, chunk_id, attempt, reason, settings)
        # Raised after the release is committed (raising inside the block would roll it back).
        if retry:
            raise TransientError(
                f"score chunk {chunk_id}, attempt {attempt} failed ({reason}); will retry"
            ) from error
        return []
    if settings.debug_chunk_delay_s:
        time.sleep(settings.debug_chunk_delay_s)  # fault drills: let a kill land mid-task
    return _complete(engine, chunk_id, attempt, keys, len(work.rows))


def _worker() -> str:
    """Who holds the lease (host:pid), for operators reading the chunk table."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class _Work:
    """A claimed chunk's inputs. rows: (item id, shard row, selectable) of its items still
    unlabeled or queued, in id order; only unlabeled items outside the evaluation set are
    selectable (queued ones are scored for their tasks' predictions)."""

    project: Project
    cycle_number: int
    chunk_index: int
    shard_key: str
    folder: str
    model_version: int
    checkpoint: Checkpoint
    rows: list[tuple[int, int, bool]]


def _read(engine: sa.Engine, chunk_id: int, settings: Settings) -> _Work:
    with session_scope(engine) as session:
        chunk = session.get(ScoreChunk, chunk_id)
        assert chunk is not None
        cycle = session.get(Cycle, chunk.cycle_id)
        assert cycle is not None
        project = session.get(Project, cycle.project_id)
        assert project is not None
        logs.bind(project=project.name, cycle_id=cycle.id)
        model_row = session.exec(
            select(ModelVersion).where(
                ModelVersion.project_id == project.id,
                ModelVersion.version == cycle.model_version,
            )
        ).one()
        # Items labeled since the cycle started are not scored.
        rows = session.execute(
            sa.select(col(Item.id), col(Item.shard_row), col(Item.status), col(Item.eval_set))
            .where(
                col(Item.project_id) == project.id,
                col(Item.shard_key) == chunk.shard_key,
                col(Item.status).in_(SCORED_STATUSES),
            )
            .order_by(col(Item.id))
        ).all()
    return _Work(
        project=project,
        cycle_number=cycle.number,
        chunk_index=chunk.index,
        shard_key=chunk.shard_key,
        folder=safe_key(project.name, "cycles", f"c{cycle.id:08d}"),
        model_version=model_row.version,
        checkpoint=load_model(project, model_row, settings),
        rows=[
            (item_id, int(row or 0), status == ItemStatus.UNLABELED and not in_eval)
            for item_id, row, status, in_eval in rows
        ],
    )


def _score(work: _Work, settings: Settings) -> tuple[str, str]:
    """Score the chunk's items; returns the store keys of (candidates, per-item scores)."""
    store = project_store(work.project, settings)
    shard = load_shard(store, work.shard_key)
    item_ids = np.array([item_id for item_id, _, _ in work.rows], dtype=np.int64)
    selectable = np.array([flag for _, _, flag in work.rows], dtype=bool)
    output = predict(
        work.checkpoint, shard.data[np.array([row for _, row, _ in work.rows])], settings
    )
    gamma = scalar_gamma(work.checkpoint.loss)
    selection = SelectionConfig.from_dict(work.project.selection_config)
    seed = derive_seed(work.project.seed, work.cycle_number, Purpose.STRATEGY, work.chunk_index)
    kept = chunk_picks(
        item_ids=item_ids[selectable],
        probs=output.probs[selectable],
        embeddings=output.embeddings[selectable],
        strategy=make_strategy(selection.strategy, seed=seed, gamma=gamma),
        k_prime=work.project.batch_size * selection.candidate_multiplier(),
    )
    scores = parquet_bytes(
        per_item_scores(item_ids, output.probs, gamma, work.project.labels, work.model_version)
    )
    scores_key = f"{work.folder}/scores/{sha256_hex(scores)}.parquet"
    store.put_if_absent(scores_key, scores)
    candidates = parquet_bytes(candidates_to_table(kept))
    candidates_key = f"{work.folder}/candidates/{sha256_hex(candidates)}.parquet"
    store.put_if_absent(candidates_key, candidates)
    return candidates_key, scores_key


def _complete(
    engine: sa.Engine, chunk_id: int, attempt: int, keys: tuple[str, str] | None, scored: int
) -> list[Step]:
    """Mark the chunk done (fenced by the attempt) and count it on the cycle."""
    with session_scope(engine) as session:
        now = utcnow()
        done = session.execute(
            sa.update(ScoreChunk)
            .where(
                col(ScoreChunk.id) == chunk_id,
                col(ScoreChunk.state) == ChunkState.RUNNING,
                col(ScoreChunk.attempts) == attempt,
            )
            .values(
                state=ChunkState.DONE,
                result_key=keys[0] if keys else None,
                scores_key=keys[1] if keys else None,
                items_scored=scored,
                lease_expires_at=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            return []  # our lease was taken over; the other attempt completes it
        chunk = session.get(ScoreChunk, chunk_id)
        assert chunk is not None
        counted = session.execute(
            sa.update(Cycle)
            .where(col(Cycle.id) == chunk.cycle_id, col(Cycle.state) == CycleState.SCORING)
            .values(chunks_done=Cycle.chunks_done + 1, updated_at=now)
            .returning(col(Cycle.chunks_done), col(Cycle.chunks_total))
        ).first()
        if counted is None or counted[0] != counted[1]:
            return []
        transition_cycle(session, chunk.cycle_id, CycleState.SELECTING)
        return [Step(Stage.SELECT, chunk.cycle_id)]
