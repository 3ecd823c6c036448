"""Starting a cycle from the edges (CLI, API): the broker is checked before the cycle exists, so
an unreachable broker leaves no pending cycle behind to block the next start, and the caller
gets one line naming the broker (password hidden) and the reason.

The broker is a hint, the database the truth: a start whose message is lost after the check
passed still ends well, since the cycle is failed at once with the same reason (never left
pending), and `recover_stalled` re-enqueues any cycle whose message the broker later drops.
"""

from collections.abc import Callable

import redis
import sqlalchemy as sa
from celery import Celery
from kombu.utils.url import maybe_sanitize_url
from sqlmodel import Session

from services.config import Settings
from services.cycle.flow import Stage, task_name
from services.cycle.leases import fail_cycle
from services.cycle.start import start_cycle
from services.db import session_scope
from services.errors import TransientError
from services.heartbeats import GPU_QUEUE
from services.models import Cycle, utcnow

TRAIN_TASK = task_name(Stage.TRAIN)
# Seconds to wait for the broker before calling it unreachable.
BROKER_CHECK_TIMEOUT_S = 3.0


class BrokerUnavailable(TransientError):  # noqa: N818 (reads as "the broker is unavailable")
    """The broker cannot take messages now; nothing was started."""


def broker_location(celery: Celery) -> str:
    """The broker URL, its password hidden."""
    return str(maybe_sanitize_url(str(celery.conf.broker_url)))


def check_broker(celery: Celery) -> None:
    """BrokerUnavailable, naming the broker and why, unless it accepts a connection now."""
    try:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_CHECK_TIMEOUT_S
            )
    except Exception as error:  # kombu wraps every transport's failure differently
        raise BrokerUnavailable(
            f"the broker at {broker_location(celery)} is unreachable ({error}); nothing was started"
        ) from None


# A key the broker keeps while it keeps its data; gone means queued messages may be gone too.
BROKER_MARK = "focalloop:broker-mark"


def broker_was_reset(settings: Settings) -> bool:
    """Whether the broker (Redis) lost its data since the last call: restarted without it, or
    flushed. The first call on a new broker answers True too, which only makes recovery look
    at everything once. Brokers other than Redis are not checked (False)."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return False
    client = redis.Redis.from_url(
        settings.broker_url,
        socket_timeout=BROKER_CHECK_TIMEOUT_S,
        socket_connect_timeout=BROKER_CHECK_TIMEOUT_S,
    )
    try:
        return bool(client.set(BROKER_MARK, utcnow().isoformat(), nx=True))
    finally:
        client.close()


def start_and_enqueue(
    engine: sa.Engine,
    settings: Settings,
    celery: Celery,
    project_name: str,
    *,
    trigger: str,
    also: Callable[[Session, Cycle], None] | None = None,
) -> Cycle:
    """Start a cycle of `project_name` and enqueue its training; `also(session, cycle)` runs in
    the starting transaction (the API's audit entry). BrokerUnavailable when the broker cannot
    take the message: before the start, nothing exists; after it, the cycle is failed with the
    reason, so no pending cycle blocks the next start."""
    check_broker(celery)
    with session_scope(engine) as session:
        cycle = start_cycle(session, project_name, trigger=trigger, settings=settings)
        if also is not None:
            also(session, cycle)
    try:
        celery.send_task(TRAIN_TASK, args=[cycle.id], queue=GPU_QUEUE, retry=False)
    except Exception as error:
        reason = (
            f"training could not be enqueued: the broker at {broker_location(celery)} ({error})"
        )
        with session_scope(engine) as session:
            fail_cycle(session, cycle.id or 0, reason)
        raise BrokerUnavailable(f"{reason}; cycle {cycle.number} was failed") from None
    return cycle
