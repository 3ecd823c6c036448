"""The in-process runner: the flow's steps run one after another in this process, with no
broker. `focalloop up` without Redis runs the loop this way beside the API, and the simulation
(`simulate`, `demo`, `bench label-efficiency`) runs every cycle this way; both leave exactly the
rows a Celery run leaves, because they run the same stages (`stages.run_step`)."""

import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable

import sqlalchemy as sa
from sqlmodel import col, select

from labeling.registry import reconcile_all
from services.config import Settings
from services.cycle.flow import Stage, Step
from services.cycle.recover import recover_stalled
from services.cycle.stages import run_step
from services.cycle.trigger import start_due_cycles
from services.db import session_scope
from services.errors import TransientError
from services.heartbeats import HEARTBEAT_INTERVAL_S, QUEUES, record_heartbeat
from services.models import Cycle, CycleState

log = logging.getLogger(__name__)


RETRIES = 8  # a step that raised TransientError runs again, as often as Celery would retry it


def drain(
    engine: sa.Engine,
    settings: Settings,
    steps: Iterable[Step],
    *,
    timed: Callable[[Step, float], None] | None = None,
) -> None:
    """Run `steps` and every step that follows them, first come first served; `timed` hears of
    each step run and the seconds it took. A step that raises `TransientError` goes to the back
    of the queue (its stage released what it held), up to `RETRIES` times, as a Celery retry
    would; the other steps go on meanwhile."""
    queue = deque(steps)
    failures: Counter[Step] = Counter()
    while queue:
        step = queue.popleft()
        started = time.perf_counter()
        try:
            following = run_step(engine, settings, step)
        except TransientError:
            failures[step] += 1
            if failures[step] > RETRIES:
                raise
            log.warning("step %s failed for now (try %d); running it again", step, failures[step])
            queue.append(step)
            continue
        queue.extend(following)
        if timed is not None:
            timed(step, time.perf_counter() - started)


def run_cycle(
    engine: sa.Engine,
    cycle_id: int,
    settings: Settings,
    *,
    timed: Callable[[Step, float], None] | None = None,
) -> None:
    """One cycle from training to the ingest of whatever its labeler answered at once."""
    drain(engine, settings, [Step(Stage.TRAIN, cycle_id)], timed=timed)


class InProcessLoop(threading.Thread):
    """Beat and one worker in a thread: every `schedule_interval_s` it starts the cycles that
    are due and runs every pending one (those the API started too), finishes what an earlier
    pass left half done, and reconciles labelers on their own interval."""

    def __init__(self, engine: sa.Engine, settings: Settings) -> None:
        super().__init__(name="focalloop-in-process-loop", daemon=True)
        self.engine = engine
        self.settings = settings
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        threading.Thread(target=self._heartbeat, name="focalloop-heartbeat", daemon=True).start()
        interval = self.settings.schedule_interval_s
        sync_every = self.settings.label_studio_sync_interval_s
        since_sync = sync_every  # reconcile on the first pass
        while not self.stopping.is_set():
            try:
                self.step(sync=since_sync >= sync_every)
            except Exception:
                # One failed pass (a store or Label Studio unreachable) must not end the loop.
                log.exception("in-process loop pass failed; trying again")
            since_sync = 0.0 if since_sync >= sync_every else since_sync
            since_sync += interval
            self.stopping.wait(interval)

    def _heartbeat(self) -> None:
        """While this loop's thread lives, it serves both queues: /ready reads it as it reads a
        Celery worker's heartbeat (a pass can take minutes, so the beat is a thread of its own)."""
        name = f"in-process@{socket.gethostname()}"
        while self.is_alive() and not self.stopping.is_set():
            try:
                record_heartbeat(self.engine, name, QUEUES, os.getpid())
            except Exception:
                log.warning("could not write the in-process loop's heartbeat", exc_info=True)
            self.stopping.wait(HEARTBEAT_INTERVAL_S)

    def step(self, *, sync: bool) -> None:
        start_due_cycles(self.engine, self.settings)
        with session_scope(self.engine) as session:
            pending = list(
                session.exec(
                    select(Cycle.id)
                    .where(Cycle.state == CycleState.PENDING)
                    .order_by(col(Cycle.id))
                ).all()
            )
        for cycle_id in pending:
            if self.stopping.is_set():
                return
            run_cycle(self.engine, cycle_id or 0, self.settings)
        self.recover()
        if sync:
            reconcile_all(self.engine, self.settings)

    def recover(self) -> None:
        """Finish what an earlier pass left half done (a stage that raised, e.g. SQLite busy
        while the API wrote): beat's `recover_stalled` decides, and the steps run here instead
        of being enqueued. No message is ever in flight here, so every unprocessed event is
        this loop's to ingest (simulated answers and webhooks alike)."""
        drain(self.engine, self.settings, recover_stalled(self.engine, self.settings).steps())
