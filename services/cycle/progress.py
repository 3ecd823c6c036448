"""Training's live progress on the cycle row: epoch of N with its losses, written at most once
per interval so a fast small model does not turn every epoch into a database write.

Best effort by design: a progress write that fails (the database briefly away) is logged and
dropped; the cycle's state, not its progress, is what recovery relies on.
"""

import logging
import math
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlmodel import col

from services.ml.train import EpochDone
from services.models import Cycle, CycleState, utcnow

log = logging.getLogger(__name__)


class TrainingProgress:
    """An `on_epoch` callback for `train`: records the newest epoch on cycle `cycle_id` while
    training attempt `attempt` holds it, at most every `interval_s` seconds (and always for the
    last possible epoch). An attempt that lost its lease writes nothing over its successor's."""

    def __init__(
        self,
        engine: sa.Engine,
        cycle_id: int,
        attempt: int,
        *,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._cycle_id = cycle_id
        self._attempt = attempt
        self._interval_s = interval_s
        self._clock = clock
        self._last_write = -math.inf
        self._started_at = utcnow().isoformat()

    def __call__(self, done: EpochDone) -> None:
        now = self._clock()
        if done.epoch < done.max_epochs and now - self._last_write < self._interval_s:
            return
        self._last_write = now
        progress = {
            "epoch": done.epoch,
            "epochs": done.max_epochs,
            "train_loss": done.train_loss,
            "val_loss": done.val_loss,
            "started_at": self._started_at,
            "at": utcnow().isoformat(),
        }
        try:
            with self._engine.begin() as connection:
                connection.execute(
                    sa.update(Cycle)
                    .where(
                        col(Cycle.id) == self._cycle_id,
                        col(Cycle.state) == CycleState.TRAINING,
                        col(Cycle.train_attempts) == self._attempt,
                    )
                    .values(progress=progress)
                )
        except sa.exc.SQLAlchemyError as error:
            log.warning("cycle %d: progress not recorded (%s)", self._cycle_id, error)
