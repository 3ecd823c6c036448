"""Each stage of the flow and the function that runs it: the one way a step is run, by the
Celery tasks and by the in-process runner alike."""

import logging
from collections.abc import Callable

import sqlalchemy as sa
from sqlmodel import select

from services.config import Settings
from services.cycle.flow import Stage, Step, check_following
from services.cycle.hand_off import hand_off_stage
from services.cycle.ingest import ingest_stage
from services.cycle.score import score_stage
from services.cycle.select import select_stage
from services.cycle.train import train_stage
from services.db import session_scope
from services.models import Cycle, ScoreChunk, utcnow

log = logging.getLogger(__name__)

StageFunction = Callable[[sa.Engine, Settings, Step], list[Step]]

STAGES: dict[Stage, StageFunction] = {
    Stage.TRAIN: train_stage,
    Stage.SCORE: score_stage,
    Stage.SELECT: select_stage,
    Stage.HAND_OFF: hand_off_stage,
    Stage.INGEST: ingest_stage,
}


def run_step(engine: sa.Engine, settings: Settings, step: Step) -> list[Step]:
    """Run one step and return the steps that follow it (checked against the flow). An error
    is written on the step's cycle before it propagates (to a retry, or to the lease that
    redoes the step), so `cycle status` says why a cycle is taking long, not only the log."""
    try:
        return check_following(step, STAGES[step.stage](engine, settings, step))
    except Exception as error:
        _record_error(engine, step, error)
        raise


def _record_error(engine: sa.Engine, step: Step, error: Exception) -> None:
    if step.stage == Stage.INGEST:
        return  # ingest sets each bad event aside with its reason (events.py)
    try:
        with session_scope(engine) as session:
            cycle_id = step.target
            attempt = ""
            if step.stage == Stage.SCORE:
                chunk = session.exec(select(ScoreChunk).where(ScoreChunk.id == step.target)).first()
                if chunk is None:
                    return
                cycle_id, attempt = chunk.cycle_id, f"chunk {chunk.index}, attempt {chunk.attempts}"
            cycle = session.exec(select(Cycle).where(Cycle.id == cycle_id)).first()
            if cycle is None:
                return
            if step.stage == Stage.TRAIN:
                attempt = f"attempt {cycle.train_attempts}"
            where = f"{step.stage.value} ({attempt})" if attempt else step.stage.value
            cycle.last_error = f"{where}: {type(error).__name__}: {error}"[:4000]
            cycle.last_error_at = utcnow()
            session.add(cycle)
    except Exception:
        # The database may be what failed; the original error is what must propagate.
        log.warning("could not record the error of %s on its cycle", step, exc_info=True)
