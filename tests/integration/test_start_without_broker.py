"""Starting a cycle when the broker cannot take the training message: one line saying which
broker and why, and no pending cycle left behind to block the next start. Before, the CLI
printed a 142-line kombu traceback and left a pending cycle that refused every later start
("already has an active cycle") until someone cancelled it."""

import subprocess
import sys
from pathlib import Path

import redis
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import select

from services import db
from services.api.app import create_app
from services.config import Settings, child_environment
from services.models import Cycle, CycleState
from services.projects import ProjectSpec, create_project, get_project
from tests.integration.api_harness import Api
from tests.integration.conftest import PrivateRedis, free_port, unique_name


def new_project(engine: sa.Engine, tmp_path: Path) -> str:
    name = unique_name("nobroker")
    with db.session_scope(engine) as session:
        create_project(
            session,
            ProjectSpec(
                name=name,
                labels=["other", "eight"],
                modality="features",
                store_url=f"file://{tmp_path / 'store'}",
            ),
        )
    return name


def cycles_of(engine: sa.Engine, name: str) -> list[tuple[str, str | None]]:
    with db.session_scope(engine) as session:
        project = get_project(session, name)
        return [
            (str(cycle.state), cycle.failure_reason)
            for cycle in session.exec(select(Cycle).where(Cycle.project_id == project.id)).all()
        ]


def test_the_api_answers_503_and_starts_nothing_when_the_broker_is_down(
    engine: sa.Engine, settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    name = new_project(engine, tmp_path)
    closed = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    down = settings.model_copy(update={"broker_url": closed})
    with TestClient(create_app(down, engine=engine)) as client:
        api = Api(client, engine)
        answer = client.post(f"/api/v1/projects/{name}/cycles", headers=api.headers("write"))
    assert answer.status_code == 503, answer.text
    detail = answer.json()["detail"]
    assert "unreachable" in detail and "127.0.0.1" in detail and "hunter2" not in detail
    assert cycles_of(engine, name) == []
    # Once the broker answers, the next start is not blocked by anything the failure left.
    up = settings.model_copy(update={"broker_url": private_redis.url})
    with TestClient(create_app(up, engine=engine)) as client:
        api = Api(client, engine)
        answer = client.post(f"/api/v1/projects/{name}/cycles", headers=api.headers("write"))
    assert answer.status_code == 202, answer.text
    assert cycles_of(engine, name) == [("pending", None)]


def test_a_broker_that_refuses_the_message_fails_the_cycle_instead_of_leaving_it_pending(
    engine: sa.Engine, settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    name = new_project(engine, tmp_path)
    # Redis out of memory: it accepts the connection, then refuses every write.
    redis.Redis(port=private_redis.port).config_set("maxmemory", "1")
    full = settings.model_copy(update={"broker_url": private_redis.url})
    with TestClient(create_app(full, engine=engine)) as client:
        api = Api(client, engine)
        answer = client.post(f"/api/v1/projects/{name}/cycles", headers=api.headers("write"))
    assert answer.status_code == 503, answer.text
    assert "could not be enqueued" in answer.json()["detail"]
    ((state, reason),) = cycles_of(engine, name)
    assert state == CycleState.FAILED and "maxmemory" in str(reason)


def test_the_command_line_says_one_line_and_exits_2(
    engine: sa.Engine, settings: Settings, tmp_path: Path
) -> None:
    name = new_project(engine, tmp_path)
    down = settings.model_copy(
        update={
            "broker_url": f"redis://127.0.0.1:{free_port()}/0",
            "database_url": engine.url.render_as_string(hide_password=False),
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "cycle", "start", name],
        env=child_environment(down),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    output = (result.stdout + result.stderr).strip()
    assert len(output.splitlines()) == 1, output
    assert "unreachable" in output and "nothing was started" in output
    assert cycles_of(engine, name) == []
