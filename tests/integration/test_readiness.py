"""Readiness that tells the truth, and an API that says what to run before the database is
migrated. Before, `/ready` answered 200 with no worker running and with a store that took no
writes, and showed internal hosts and ports to anyone; an API started before `focalloop db
upgrade` answered `/metrics` with 500 (`no such table: project`)."""

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from services import db
from services.api.app import create_app
from services.config import Settings, child_environment
from services.heartbeats import QUEUES, record_heartbeat
from services.projects import ProjectSpec, create_project
from tests.integration.api_harness import Api
from tests.integration.conftest import PrivateRedis, unique_name


def test_an_unmigrated_database_answers_503_naming_the_command_until_it_is_upgraded(
    settings: Settings, tmp_path: Path
) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        with TestClient(create_app(settings, engine=engine)) as client:
            for path in ("/metrics", "/api/v1/ready", "/api/v1/projects", "/api/v1/audit"):
                answer = client.get(path)
                assert answer.status_code == 503, (path, answer.status_code, answer.text)
                assert "run `focalloop db upgrade`" in answer.json()["detail"], answer.text
            assert client.get("/api/v1/health").status_code == 200  # liveness: the process is up
            db.upgrade(engine)
            time.sleep(2.1)  # the gate looks again every 2 s; no restart is needed
            assert client.get("/metrics").status_code == 200
            assert client.get("/api/v1/projects").status_code == 401  # an ordinary answer
    finally:
        engine.dispose()


def test_a_worker_or_beat_refuses_to_start_on_an_unmigrated_database(
    settings: Settings, tmp_path: Path
) -> None:
    unmigrated = settings.model_copy(
        update={"database_url": f"sqlite:///{tmp_path / 'state.db'}", "broker_url": "memory://"}
    )
    for command in (["worker", "--queues", "io"], ["beat"]):
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", *command],
            env=child_environment(unmigrated),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = (result.stdout + result.stderr).strip()
        assert result.returncode == 2, output
        assert output.endswith("run `focalloop db upgrade`"), output


@pytest.fixture(params=["sqlite", "postgresql"])
def own_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """A database of this test's own: /ready looks at every project's store and every
    worker's heartbeat, so it must not see (or leave behind) other tests' rows."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("own_pg_database_url")
    engine = db.make_engine(url)
    db.upgrade(engine)
    yield engine
    engine.dispose()


def test_ready_needs_a_live_worker_per_queue_and_a_writable_store_and_tells_only_a_token(
    own_engine: sa.Engine, settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    engine = own_engine
    settings = settings.model_copy(
        update={"broker_url": private_redis.url, "heartbeat_stale_s": 3.0}
    )
    name = unique_name("ready")
    with db.session_scope(engine) as session:
        create_project(
            session,
            ProjectSpec(
                name=name,
                labels=["a", "b"],
                modality="features",
                store_url=f"file://{tmp_path / 'store'}",
            ),
        )
    with TestClient(create_app(settings, engine=engine)) as client:
        api = Api(client, engine)
        token = api.headers("read")

        def ready(*, with_token: bool) -> tuple[int, dict[str, object]]:
            answer = client.get("/api/v1/ready", headers=token if with_token else {})
            return answer.status_code, answer.json()

        # No worker has ever beaten: not ready; a caller without a token learns only that.
        assert ready(with_token=False) == (503, {"ready": False})
        status, body = ready(with_token=True)
        checks = body["checks"]
        assert status == 503 and isinstance(checks, dict)
        assert not checks["workers"]["ok"] and "gpu or io" in checks["workers"]["detail"]
        assert checks["database"]["ok"] and checks["broker"]["ok"] and checks["store"]["ok"]

        record_heartbeat(engine, f"w-{name}@host", QUEUES, 4242)
        assert ready(with_token=False) == (200, {"ready": True})
        status, body = ready(with_token=True)
        assert status == 200 and f"w-{name}@host" in str(body)
        assert ready(with_token=False)[1] == {"ready": True}  # nothing more without a token

        time.sleep(3.5)  # the worker went silent for longer than heartbeat_stale_s
        assert ready(with_token=False) == (503, {"ready": False})
        record_heartbeat(engine, f"w-{name}@host", ["io"], 4242)
        status, body = ready(with_token=True)
        assert status == 503 and "consuming gpu has" in str(body)

        # A store that cannot take a write (its folder is under a file) is not ready either.
        record_heartbeat(engine, f"w-{name}@host", QUEUES, 4242)
        blocked = tmp_path / "not-a-folder"
        blocked.write_bytes(b"")
        with db.session_scope(engine) as session:
            create_project(
                session,
                ProjectSpec(
                    name=unique_name("ro"),
                    labels=["a", "b"],
                    modality="features",
                    store_url=f"file://{blocked / 'store'}",
                ),
            )
        status, body = ready(with_token=True)
        checks = body["checks"]
        assert status == 503 and isinstance(checks, dict)
        assert not checks["store"]["ok"] and "not-a-folder" in checks["store"]["detail"]
