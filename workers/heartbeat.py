"""The worker's heartbeat: a consumer bootstep whose timer runs in the consumer's event loop, so
the row stops being written when the loop stops consuming (a lost broker being reconnected, a
hung or dead worker) and `/ready` says so."""

import logging
import os
from typing import Any

import sqlalchemy as sa
from celery import bootsteps

from services.config import get_settings
from services.db import engine_from_settings
from services.heartbeats import HEARTBEAT_INTERVAL_S, record_heartbeat

log = logging.getLogger("focalloop.workers")


_ENGINE: sa.Engine | None = None


def _beat(name: str, queues: list[str]) -> None:
    global _ENGINE
    try:
        if _ENGINE is None:  # the main process's own (pool processes never write heartbeats)
            _ENGINE = engine_from_settings(get_settings())
        record_heartbeat(_ENGINE, name, queues, os.getpid())
    except Exception:
        # The database being down is /ready's to report; the worker goes on consuming.
        log.warning("could not write the worker heartbeat", exc_info=True)


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
