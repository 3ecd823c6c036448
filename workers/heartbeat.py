"""The worker's heartbeat: a consumer bootstep whose timer runs in the consumer's event loop, so
the row stops being written when the loop stops consuming (a lost broker being reconnected, a
hung or dead worker) and `/ready` says so. The loop stamps the time; a thread writes it."""

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from celery import bootsteps

from services.config import get_settings
from services.db import engine_from_settings
from services.heartbeats import HEARTBEAT_INTERVAL_S, record_heartbeat
from services.models import utcnow

log = logging.getLogger("focalloop.workers")


_ENGINE: sa.Engine | None = None
# One writer thread: the event loop only notes that it ran; a database write (which may wait on
# SQLite's lock for seconds) must never stall the consumer.
_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="focalloop-heartbeat")
_in_flight: Future[None] | None = None


def _write(name: str, queues: list[str], at: datetime) -> None:
    global _ENGINE
    try:
        if _ENGINE is None:  # the main process's own (pool processes never write heartbeats)
            _ENGINE = engine_from_settings(get_settings())
        record_heartbeat(_ENGINE, name, queues, os.getpid(), at=at)
    except Exception:
        # The database being down is /ready's to report; the worker goes on consuming.
        log.warning("could not write the worker heartbeat", exc_info=True)


def _beat(name: str, queues: list[str]) -> None:
    """On the event loop: stamp now, and hand the write to the writer unless one is pending."""
    global _in_flight
    if _in_flight is None or _in_flight.done():
        _in_flight = _WRITER.submit(_write, name, queues, utcnow())


def forget_inherited_engine() -> None:
    """In a forked pool process: drop the parent's heartbeat connections without closing them
    (closing would end the parent's sessions with the database)."""
    global _ENGINE
    if _ENGINE is not None:
        _ENGINE.dispose(close=False)
        _ENGINE = None


class Heartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
    """Writes `WorkerHeartbeat` for this node and its queues every `HEARTBEAT_INTERVAL_S`,
    from the moment it consumes until the consumer stops (or restarts after a lost broker)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer_entry: Any = None

    def start(self, consumer: Any) -> None:
        queues = sorted(queue.name for queue in consumer.task_consumer.queues)
        arguments = (consumer.hostname, queues)
        _beat(*arguments)
        self.timer_entry = consumer.timer.call_repeatedly(HEARTBEAT_INTERVAL_S, _beat, arguments)

    def stop(self, consumer: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
