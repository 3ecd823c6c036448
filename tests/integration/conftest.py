"""Real services for the integration tests, owned by this test session.

PostgreSQL: a database with a random name, created on the machine's server and dropped at the
end. S3: moto's server over HTTP on 127.0.0.1 and a free port (never the in-process mock), a
fresh bucket per test. SQLite: a file per test. With CI=true a service that cannot be reached
fails the test; elsewhere it skips with the reason.
"""

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from moto.server import ThreadedMotoServer
from psycopg import sql
from sqlmodel import SQLModel

from services import db
from services.config import Settings
from services.datasets.store import DatasetStore, open_store
from services.servers import RedisServer

ADMIN_PG_URL = os.environ.get(
    "FOCALLOOP_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Fail under CI (a missing service is a broken build), skip elsewhere."""
    if IN_CI:
        pytest.fail(f"required service unavailable in CI: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unique_name(prefix: str) -> str:
    """A name no other test uses: projects, buckets and databases are owned per test."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def insert_row(engine: sa.Engine, row: SQLModel) -> None:
    """Insert one row in its own transaction, bypassing the services' checks (to show what the
    database itself enforces)."""
    with db.session_scope(engine) as session:
        session.add(row)
        session.flush()


@contextmanager
def _pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database with a random name, migrated to head, dropped at the end."""
    name = f"focalloop_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(ADMIN_PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        unavailable(f"PostgreSQL at {ADMIN_PG_URL}: {error}")
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = ADMIN_PG_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with psycopg.connect(ADMIN_PG_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """The test session's PostgreSQL database; tests own their rows by unique project names."""
    with _pg_database() as url:
        yield url


@pytest.fixture
def own_pg_database_url() -> Iterator[str]:
    """A PostgreSQL database for one test alone: for tests whose processes act on every
    project in the database (beat), which must not see other tests' projects."""
    with _pg_database() as url:
        yield url


@pytest.fixture(scope="session")
def pg_engine(pg_database_url: str) -> Iterator[sa.Engine]:
    engine = db.make_engine(pg_database_url)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """A migrated database on each backend: a SQLite file of this test's own, or the session's
    PostgreSQL database (tests there own their rows through unique project names)."""
    if request.param == "sqlite":
        sqlite_engine = db.make_engine(f"sqlite:///{tmp_path / 'state.db'}")
        db.upgrade(sqlite_engine)
        yield sqlite_engine
        sqlite_engine.dispose()
    else:
        yield request.getfixturevalue("pg_engine")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server, over real HTTP, for this test session."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    try:
        server.start()
    except OSError as error:
        unavailable(f"cannot start the moto S3 server: {error}")
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(params=["file", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store URL on each backend."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    return f"s3://{unique_name('bucket')}/datasets"


@pytest.fixture
def settings(s3_endpoint: str, tmp_path: Path) -> Settings:
    """Settings for one test: a private data dir and the session's S3 server."""
    return Settings(
        data_dir=tmp_path / "data",
        s3_endpoint_url=s3_endpoint,
        s3_region="us-east-1",
        s3_access_key_id="focalloop-test",
        s3_secret_access_key="focalloop-test-secret",  # type: ignore[arg-type]
    )


@pytest.fixture
def store(store_url: str, settings: Settings) -> DatasetStore:
    return open_store(store_url, settings, create=True)


class PrivateRedis(RedisServer):
    """A redis-server of this test's own: append-only like the deployment's, on a free port."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, append_only=True)

    def start(self, *, timeout_s: float = 10.0) -> None:
        try:
            super().start(timeout_s=timeout_s)
        except FileNotFoundError:
            unavailable("redis-server is not installed")
        except RuntimeError as error:
            unavailable(str(error))


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()
