"""Readiness: can this deployment reach what the loop needs? Each dependency is checked and
reported on its own (the database, the broker, every project's dataset store, every connected
Label Studio), with a short reason when it fails."""

from dataclasses import dataclass

import redis
import sqlalchemy as sa
from sqlmodel import Session, select

from services import labelstudio
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


def check_label_studio(session: Session, settings: Settings) -> Check:
    """Every connected Label Studio accepts its project's token."""
    names = labelstudio.connected_projects(session)
    failures = []
    for name in names:
        project = session.exec(select(Project).where(Project.name == name)).one()
        link = labelstudio.LabelStudioLink.of(project)
        try:
            quick = settings.model_copy(update={"label_studio_timeout_s": CHECK_TIMEOUT_S})
            labelstudio.gateway(link, quick).whoami()
        except FocalloopError as error:
            failures.append(f"{name}: {_short(error)}")
    if failures:
        return Check(False, "; ".join(failures)[:1000])
    if not names:
        return Check(True, "no project is connected")
    return Check(True, f"{len(names)} project(s) connected")
