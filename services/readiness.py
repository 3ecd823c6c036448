"""Readiness: can this deployment do what the loop needs? Each dependency is checked and
reported on its own (the database and its schema, the broker, a live worker on every queue,
every project's dataset store taking a write, every project's labeling tool), with a short
reason when it fails."""

from dataclasses import dataclass

import redis
import sqlalchemy as sa
from sqlmodel import Session, select

from labeling.registry import labeler_for
from services.config import Settings
from services.datasets.store import open_store
from services.db import head_revision, schema_problem
from services.errors import FocalloopError
from services.heartbeats import QUEUES, serving
from services.models import Project

CHECK_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def check_database(engine: sa.Engine) -> Check:
    """It answers, and its schema is the one this code needs."""
    try:
        problem = schema_problem(engine)
    except sa.exc.SQLAlchemyError as error:
        return Check(False, _short(error))
    if problem is not None:
        return Check(False, problem)
    return Check(True, f"{engine.dialect.name}, schema {head_revision()}")


def check_workers(session: Session, settings: Settings) -> Check:
    """Every queue has a worker that wrote a heartbeat in the last `heartbeat_stale_s`."""
    served = serving(session, stale_s=settings.heartbeat_stale_s)
    unserved = [queue for queue in QUEUES if not served.get(queue)]
    if unserved:
        return Check(
            False,
            f"no worker consuming {' or '.join(unserved)} has been heard from in "
            f"{settings.heartbeat_stale_s:.0f} s",
        )
    return Check(
        True,
        "; ".join(
            f"{queue}: {name} ({age:.0f} s ago)"
            for queue in QUEUES
            for name, age in served[queue][:1]
        ),
    )


def check_broker(settings: Settings) -> Check:
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return Check(True, f"not Redis ({settings.broker_url.split(':', 1)[0]}); not checked")
    client = redis.Redis.from_url(
        settings.broker_url,
        socket_timeout=CHECK_TIMEOUT_S,
        socket_connect_timeout=CHECK_TIMEOUT_S,
    )
    try:
        client.ping()
    except redis.RedisError as error:
        return Check(False, _short(error))
    finally:
        client.close()
    return Check(True, "redis answers PING")


def check_stores(session: Session, settings: Settings) -> Check:
    """Every project's dataset store takes a write (a probe object, removed at once)."""
    urls = sorted(set(session.exec(select(Project.store_url)).all()))
    failures = []
    for url in urls:
        try:
            open_store(url, settings).check_writable()
        except Exception as error:  # botocore's connection errors share no narrower base
            failures.append(f"{url}: {_short(error)}")
    if failures:
        return Check(False, "; ".join(failures)[:1000])
    return Check(True, f"{len(urls)} store(s) writable")


def check_labelers(session: Session, settings: Settings) -> Check:
    """Every project's labeling tool (Label Studio: its token is accepted) can be reached."""
    failures = []
    tools = 0
    for project in session.exec(select(Project).order_by(Project.name)).all():
        try:
            tools += labeler_for(project).check(project, settings)
        except FocalloopError as error:
            tools += 1
            failures.append(f"{project.name}: {_short(error)}")
    if failures:
        return Check(False, "; ".join(failures)[:1000])
    if not tools:
        return Check(True, "no project is connected to a labeling tool")
    return Check(True, f"{tools} project(s) connected")
