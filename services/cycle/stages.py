"""Each stage of the flow and the function that runs it: the one way a step is run, by the
Celery tasks and by the in-process runner alike."""

from collections.abc import Callable

import sqlalchemy as sa

from services.config import Settings
from services.cycle.flow import Stage, Step, check_following
from services.cycle.hand_off import hand_off_stage
from services.cycle.ingest import ingest_stage
from services.cycle.score import score_stage
from services.cycle.select import select_stage
from services.cycle.train import train_stage

StageFunction = Callable[[sa.Engine, Settings, Step], list[Step]]

STAGES: dict[Stage, StageFunction] = {
    Stage.TRAIN: train_stage,
    Stage.SCORE: score_stage,
    Stage.SELECT: select_stage,
    Stage.HAND_OFF: hand_off_stage,
    Stage.INGEST: ingest_stage,
}


def run_step(engine: sa.Engine, settings: Settings, step: Step) -> list[Step]:
    """Run one step and return the steps that follow it (checked against the flow)."""
    return check_following(step, STAGES[step.stage](engine, settings, step))
