"""Workers' signs of life, in the state database: each consuming worker writes one row every
`HEARTBEAT_INTERVAL_S` from its consumer's own event loop (`workers/heartbeat.py`; `up`'s
in-process loop writes one for both queues), and `/ready` calls a queue served when a row that
names it is younger than `Settings.heartbeat_stale_s`. A worker stuck reconnecting to the
broker, or gone, stops writing; the database, not the broker, holds the answer."""

from collections.abc import Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, select

from services.db import session_scope
from services.models import WorkerHeartbeat, utcnow

GPU_QUEUE = "gpu"
IO_QUEUE = "io"
QUEUES = (GPU_QUEUE, IO_QUEUE)
HEARTBEAT_INTERVAL_S = 5.0


def record_heartbeat(
    engine: sa.Engine,
    name: str,
    queues: Sequence[str],
    pid: int,
    *,
    at: datetime | None = None,
) -> None:
    """Say `name` (a Celery node name) consumed `queues` at `at` (default now)."""
    with session_scope(engine) as session:
        row = session.get(WorkerHeartbeat, name) or WorkerHeartbeat(name=name, queues="", pid=pid)
        row.queues = ",".join(sorted(queues))[:400]
        row.pid = pid
        row.beat_at = at or utcnow()
        session.add(row)


def serving(
    session: Session, *, stale_s: float, now: datetime | None = None
) -> dict[str, list[tuple[str, float]]]:
    """queue -> [(worker name, seconds since its last heartbeat)] for the workers heard from in
    the last `stale_s` seconds, freshest first; a queue no fresh worker serves maps to []."""
    now = now or utcnow()
    served: dict[str, list[tuple[str, float]]] = {queue: [] for queue in QUEUES}
    for row in session.exec(
        select(WorkerHeartbeat).where(WorkerHeartbeat.beat_at >= now - timedelta(seconds=stale_s))
    ).all():
        age = max(0.0, (now - row.beat_at).total_seconds())
        for queue in filter(None, row.queues.split(",")):
            served.setdefault(queue, []).append((row.name, age))
    return {queue: sorted(workers, key=lambda pair: pair[1]) for queue, workers in served.items()}
