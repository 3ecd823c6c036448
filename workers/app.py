"""The Celery app: configured from Settings, queues `gpu` (train, score_chunk) and `io` (the rest).

Delivery is at-least-once and the tasks make it effectively once: messages are acknowledged
only after the task ran (`task_acks_late`), a task whose worker process died is put back
(`task_reject_on_worker_lost`), each process reserves one message at a time (prefetch 1), and
Redis redelivers an unacknowledged message after `visibility_timeout_s`, which must exceed the
longest task. The database, not the result backend, records what happened (no results kept).
"""

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

from services.config import Settings, get_settings
from services.cycle.flow import ACCELERATED, task_name
from services.heartbeats import GPU_QUEUE, IO_QUEUE
from services.tuning import TRIAL_TASK
from workers.heartbeat import Heartbeat

# `focalloop tune`'s trials train models too: they share the gpu queue with the cycle's stages.
GPU_TASKS = tuple(sorted([*(task_name(stage) for stage in ACCELERATED), TRIAL_TASK]))
# Beat's own tasks (not stages of the flow): they start cycles, recover, reconcile.
START_DUE = "focalloop.maybe_start_cycles"
RECONCILE = "focalloop.reconcile_labelers"
RECOVER = "focalloop.recover_stalled"


def survive_redis_restarts() -> None:
    """Work around kombu 5.7 killing the worker when Redis goes away while a task runs.

    When the connection drops, celery's consumer closes it twice: the first close detaches the
    transport (`client = None`) but leaves the channel open because draining its pending BRPOP
    failed; the second close then restores the unacknowledged message and asks the detached
    transport for a new connection pool, raising AttributeError ('NoneType' has no
    'hostname'), which celery treats as unrecoverable. Raising a connection error there instead
    lets celery ignore it and reconnect as it does for any broker outage. Idempotent.
    """
    original: Callable[..., Any] = kombu_redis.Channel._connparams
    if getattr(original, "focalloop_patched", False):
        return

    def connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("channel of a closed broker connection")
        return original(self, asynchronous=asynchronous)

    connparams.focalloop_patched = True  # type: ignore[attr-defined]
    setattr(kombu_redis.Channel, "_connparams", connparams)  # noqa: B010 (a method: mypy)


def create_app(settings: Settings) -> Celery:
    """A Celery app for `settings` (nothing connects until a worker or a send needs it)."""
    survive_redis_restarts()
    app = Celery("focalloop", broker=settings.broker_url, include=["workers.tasks"])
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        # Keep retrying a lost broker rather than exiting: a Redis restart must not kill workers.
        broker_connection_max_retries=None,
        task_default_queue=IO_QUEUE,
        task_routes={name: {"queue": GPU_QUEUE} for name in GPU_TASKS},
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        beat_schedule={
            "maybe-start-cycles": {
                "task": START_DUE,
                "schedule": timedelta(seconds=settings.schedule_interval_s),
            },
            "reconcile-labelers": {
                "task": RECONCILE,
                "schedule": timedelta(seconds=settings.label_studio_sync_interval_s),
            },
            "recover-stalled": {
                "task": RECOVER,
                "schedule": timedelta(seconds=settings.recover_interval_s),
            },
        },
    )
    app.steps["consumer"].add(Heartbeat)
    return app


# The app Celery's command line and the task decorators use; created from the environment once,
# on import, without connecting to anything.
app = create_app(get_settings())
