"""Engines, sessions and migrations for the state database.

SQLite (a file) is the embedded default; PostgreSQL (psycopg 3) is used by URL. An API, a worker
and beat may share one SQLite file, so every SQLite connection runs in WAL mode (readers do not
block the writer) with a busy timeout (a second writer waits instead of failing at once).
"""

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from services.config import Settings
from services.errors import InvalidInput

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "infra" / "migrations"


def normalize_url(url: str) -> str:
    """Map the plain `postgresql://` scheme to the psycopg 3 driver (SQLAlchemy would pick
    psycopg2, which is not installed)."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    if not url.startswith(("sqlite://", "postgresql+psycopg://")):
        raise InvalidInput(
            f"unsupported database URL {url!r}: use sqlite:///path or postgresql://..."
        )
    return url


def engine_from_settings(settings: Settings) -> sa.Engine:
    return make_engine(
        settings.resolved_database_url(), busy_timeout_ms=settings.sqlite_busy_timeout_ms
    )


def make_engine(url: str, *, busy_timeout_ms: int = 15_000) -> sa.Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and enforced foreign keys."""
    url = normalize_url(url)
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True)
    database = sa.make_url(url).database
    if database and database != ":memory:":
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000})

    @sa.event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def lock_for_write(session: Session) -> None:
    """Make the session's transaction the database's writer from here on, so what it reads next
    cannot change before it commits. PostgreSQL does this per row (`SELECT ... FOR UPDATE`);
    SQLite ignores FOR UPDATE and, in Python's sqlite3, runs reads outside any transaction, so
    a read-modify-write there would overwrite a change committed in between. Here an SQLite
    session with no transaction open begins one with `BEGIN IMMEDIATE` (waiting up to the busy
    timeout for the write lock); one already open has written, so it holds the lock already.
    Only read-modify-write paths call this: a session holding the lock must not wait on a second
    session of its own thread that writes."""
    connection = session.connection()
    if connection.dialect.name != "sqlite":
        return
    driver = connection.connection.driver_connection
    if driver is not None and not driver.in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def insert_unless_present(dialect: str, table: Any, keys: list[str]) -> Any:
    """An INSERT into `table` that inserts nothing where a row with the same `keys` (a unique
    constraint) exists, without a savepoint: ON CONFLICT DO NOTHING on both backends."""
    insert = postgresql_insert(table) if dialect == "postgresql" else sqlite_insert(table)
    return insert.on_conflict_do_nothing(index_elements=keys)


@contextmanager
def session_scope(engine: sa.Engine) -> Iterator[Session]:
    """A session that commits when the block ends normally and rolls back when it raises."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def _alembic_config(engine: sa.Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision` (idempotent: an up-to-date database is left alone)."""
    command.upgrade(_alembic_config(engine), revision)


def current_revision(engine: sa.Engine) -> str | None:
    """The database's migration revision, or None before the first upgrade."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def schema_problem(engine: sa.Engine) -> str | None:
    """What is wrong with the database's schema for this code, or None when it is current.
    Raises SQLAlchemy's errors when the database cannot be reached."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return None
    found = "has no focalloop tables" if current is None else f"is at schema {current}"
    return f"the database {found}; this focalloop needs {head}: run `focalloop db upgrade`"


@functools.cache
def head_revision() -> str:
    """The newest migration shipped with this code."""
    head = ScriptDirectory.from_config(
        _alembic_config(sa.create_engine("sqlite://"))
    ).get_current_head()
    assert head is not None, "no migrations found"
    return head
