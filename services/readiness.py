"""Readiness: can this deployment reach what the loop needs? Each dependency is checked and
reported on its own (the database, the broker, every project's dataset store, every project's
labeling tool), with a short reason when it fails."""

from dataclasses import dataclass

import redis
import sqlalchemy as sa
from sqlmodel import Session, select

from labeling.registry import labeler_for
from services.config import Settings
from services.datasets.store import open_store
from services.errors import FocalloopError
from services.models import Project

CHECK_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str


def _short(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def check_database(engine: sa.Engine) -> Check:
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as error:
        return Check(False, _short(error))
    return Check(True, engine.dialect.name)


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
    """Every project's dataset store answers a lookup (a missing key is an answer)."""
    urls = sorted(set(session.exec(select(Project.store_url)).all()))
    failures = []
    for url in urls:
        try:
            open_store(url, settings).exists("focalloop-readiness-probe")
        except Exception as error:  # botocore's connection errors share no narrower base
            failures.append(f"{url}: {_short(error)}")
    if failures:
        return Check(False, "; ".join(failures)[:1000])
    return Check(True, f"{len(urls)} store(s) reachable")


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
