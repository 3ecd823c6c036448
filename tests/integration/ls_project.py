"""A project connected to the session's Label Studio, our API under uvicorn and a private broker,
for the Label Studio tests; and the helpers they share."""

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
from pydantic import SecretStr
from sqlmodel import col, select

from labeling.base import IngestReport
from labeling.label_studio import link
from labeling.label_studio.server import LocalLabelStudio
from services import db
from services.api import create_app
from services.auth import create_token
from services.config import Settings
from services.cycle.ingest import ingest_events, pending_events
from services.cycle.trigger import maybe_start_cycle
from services.datasets.pool import add_to_pool
from services.models import (
    InboxEvent,
    Item,
    LabelTask,
)
from services.projects import ProjectSpec, create_project, get_project
from tests.conftest import Digits
from tests.integration.conftest import PrivateRedis, free_port
from tests.integration.cycle_helpers import run_stages
from tests.integration.ls_harness import (
    TOKEN_ENV,
    WEBHOOK_SECRET,
    ApiServer,
)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def api_port() -> int:
    return free_port()


@pytest.fixture
def ls_settings(
    settings: Settings, broker: PrivateRedis, api_port: int, tmp_path: Path
) -> Settings:
    return settings.model_copy(
        update={
            "api_url": f"http://127.0.0.1:{api_port}",
            "webhook_secret": SecretStr(WEBHOOK_SECRET),
            "broker_url": broker.url,
            "source_roots": [f"file://{tmp_path}"],
        }
    )


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    db.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def api(sqlite_engine: sa.Engine, ls_settings: Settings, api_port: int) -> Iterator[ApiServer]:
    server = ApiServer(lambda: create_app(ls_settings, engine=sqlite_engine), api_port)
    server.start()
    yield server
    server.stop()


def connect(
    engine: sa.Engine,
    name: str,
    ls: LocalLabelStudio,
    settings: Settings,
    *,
    review_threshold: float = link.DEFAULT_REVIEW_THRESHOLD,
) -> int:
    with db.session_scope(engine) as session:
        connected = link.connect(
            session,
            name,
            url=ls.url,
            token_env=TOKEN_ENV,
            settings=settings,
            review_threshold=review_threshold,
        )
    return connected.project_id


def project_id_of(engine: sa.Engine, name: str) -> int:
    with db.session_scope(engine) as session:
        return get_project(session, name).id or 0


def tasks_of(engine: sa.Engine, name: str, kind: str = "label") -> list[LabelTask]:
    with db.session_scope(engine) as session:
        project_id = get_project(session, name).id
        return list(
            session.exec(
                select(LabelTask)
                .where(LabelTask.project_id == project_id, LabelTask.kind == kind)
                .order_by(col(LabelTask.id))
            ).all()
        )


def item_of(engine: sa.Engine, item_id: int) -> Item:
    with db.session_scope(engine) as session:
        item = session.get(Item, item_id)
        assert item is not None
        return item


def true_label(digits: Digits, external_id: str) -> str:
    return "eight" if digits.labels[int(external_id[1:])] == 8 else "other"


def ingest_all(engine: sa.Engine) -> IngestReport:
    with db.session_scope(engine) as session:
        pending = pending_events(session)
    return ingest_events(engine, pending)


def enqueued_event_ids(broker: PrivateRedis) -> set[int]:
    """The inbox event ids carried by the `ingest` messages waiting on the io queue (kombu's
    Redis transport: a JSON envelope around the base64 body [args, kwargs, embed])."""
    ids: set[int] = set()
    for raw in redis.Redis.from_url(broker.url).lrange("io", 0, -1):
        envelope = json.loads(raw)
        assert envelope["headers"]["task"] == "focalloop.ingest"
        args, _, _ = json.loads(base64.b64decode(envelope["body"]))
        ids.update(args[0])
    return ids


def inbox_ids(engine: sa.Engine, project_id: int) -> set[int]:
    with db.session_scope(engine) as session:
        return {
            int(i or 0)
            for i in session.exec(
                select(InboxEvent.id).where(InboxEvent.project_id == project_id)
            ).all()
        }


def register(
    engine: sa.Engine, settings: Settings, spec: ProjectSpec, source: str, root: str
) -> None:
    """Create a project and register one pool source from a trusted root."""
    with db.session_scope(engine) as session:
        project_row = create_project(session, spec)
        add_to_pool(session, project_row, source, settings=settings, trusted_roots=[root])


def project_token(engine: sa.Engine, project: str, scope: str) -> str:
    """A new API token of `scope`, restricted to `project`."""
    with db.session_scope(engine) as session:
        _, secret = create_token(
            session, name=f"label studio {scope}", scope=scope, actor="test", project=project
        )
    return secret


class LabelStudioAdmin:
    """Label Studio's REST API as its admin uses it from the Model settings and Data Manager."""

    def __init__(self, server: LocalLabelStudio, token: str) -> None:
        self.url = server.url
        self.headers = {"Authorization": f"Token {token}"}

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method, f"{self.url}{path}", headers=self.headers, timeout=60, **kwargs
        )

    def drop_predictions(self, task_id: int) -> None:
        task = self.call("GET", f"/api/tasks/{task_id}/").json()
        for prediction in task["predictions"]:
            self.call("DELETE", f"/api/predictions/{prediction['id']}/").raise_for_status()

    def add_model_backend(
        self, engine: sa.Engine, project: str, ls_project: int, api_url: str
    ) -> dict[str, Any]:
        """focalloop added under the project's Model settings (basic auth with a write token of
        the project); Label Studio checks /health and /setup itself. The backend's record."""
        added = self.call(
            "POST",
            "/api/ml",
            json={
                "project": ls_project,
                "url": f"{api_url}/api/v1/projects/{project}/label-studio-backend",
                "title": "focalloop",
                "auth_method": "BASIC_AUTH",
                "basic_auth_user": "label-studio",
                "basic_auth_pass": project_token(engine, project, "write"),
            },
        )
        assert added.status_code == 201, added.text
        backend: dict[str, Any] = added.json()
        assert backend["state"] == "CO", backend  # connected
        return backend


def first_cycle(engine: sa.Engine, name: str, settings: Settings) -> int:
    cycle = maybe_start_cycle(engine, name, settings)
    assert cycle is not None and cycle.id is not None
    run_stages(engine, cycle.id, settings)
    return cycle.id


# ---------------------------------------------------------------------------------- connect
