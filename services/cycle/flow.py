"""The flow, declared once: which stage follows which.

A stage takes a step (a cycle, a chunk or inbox events), does its work over the database and
the store, and returns the steps that follow it. Whoever runs the loop only moves steps: the
Celery tasks send each returned step as a message, the in-process runner (`runner.drain`) runs
them in this process. `FOLLOWS` is the contract every stage's return is checked against
(`stages.run_step`).
"""

from dataclasses import dataclass
from enum import StrEnum


class Stage(StrEnum):
    """The cycle's stages that run as units of work (Celery task `task_name(stage)`)."""

    TRAIN = "train"
    SCORE = "score_chunk"
    SELECT = "select"
    HAND_OFF = "hand_off"
    INGEST = "ingest"


# The stages that run a model: on a GPU when there is one (the gpu queue).
ACCELERATED = frozenset({Stage.TRAIN, Stage.SCORE})


def task_name(stage: Stage) -> str:
    """The Celery task that runs `stage`: what workers register, and the API and beat send."""
    return f"focalloop.{stage.value}"


# train -> score every chunk (or select at once: cold start, nothing to score) -> the chunk that
# completes scoring -> select -> hand off -> ingest what the labeler answered at once -> train
# the next cycle when those answers made one due.
FOLLOWS: dict[Stage, frozenset[Stage]] = {
    Stage.TRAIN: frozenset({Stage.SCORE, Stage.SELECT}),
    Stage.SCORE: frozenset({Stage.SELECT}),
    Stage.SELECT: frozenset({Stage.HAND_OFF}),
    Stage.HAND_OFF: frozenset({Stage.INGEST}),
    Stage.INGEST: frozenset({Stage.TRAIN}),
}


@dataclass(frozen=True)
class Step:
    """One unit of work. target: the cycle id (train, select, hand_off) or the score chunk's id;
    event_ids: the inbox events to ingest (ingest only)."""

    stage: Stage
    target: int = 0
    event_ids: tuple[int, ...] = ()

    @property
    def args(self) -> list[int] | list[list[int]]:
        """The Celery task's arguments."""
        return [list(self.event_ids)] if self.stage == Stage.INGEST else [self.target]


class FlowError(RuntimeError):
    """A stage returned a step the flow does not allow after it: a programming error."""


def check_following(step: Step, following: list[Step]) -> list[Step]:
    """`following` if every step in it may follow `step`, else FlowError."""
    wrong = [s.stage for s in following if s.stage not in FOLLOWS[step.stage]]
    if wrong:
        raise FlowError(f"{step.stage} may not be followed by {wrong}")
    return following
