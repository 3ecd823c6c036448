"""Limits on every REST request: a body past its route's cap is refused (413) before it is
parsed, whether its length is declared or streamed; malformed JSON is a 400; a 422 names what
was wrong without echoing the input back. Before these limits a 98 MB predict body from a
read-scope token stalled the API for a minute and its 422 sent all of it back."""

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlmodel import col, func, select

from services import db
from services.api.app import create_app
from services.config import Settings
from services.models import InboxEvent
from services.projects import ProjectSpec, create_project, get_project
from tests.integration.api_harness import Api
from tests.integration.conftest import free_port, unique_name
from tests.integration.ls_harness import ApiServer, wait_for

MIB = 1024 * 1024


@pytest.fixture
def api(engine: sa.Engine, settings: Settings) -> Iterator[Api]:
    settings = settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"}  # nothing is enqueued
    )
    with TestClient(create_app(settings, engine=engine)) as client:
        yield Api(client, engine)


@pytest.fixture
def project(engine: sa.Engine, settings: Settings, tmp_path: Path) -> str:
    name = unique_name("limits")
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


def _features_body(n_bytes: int) -> bytes:
    values = b"0.5," * (n_bytes // 4)
    return b'{"features": [[' + values + b"0.5]]}"


@pytest.mark.parametrize(
    ("method", "route", "size"),
    [
        ("PATCH", "/api/v1/projects/{p}", 2 * MIB),
        ("POST", "/api/v1/projects/{p}/predict", 9 * MIB),
        ("POST", "/api/v1/projects/{p}/predict", 98 * MIB),
    ],
)
def test_a_body_past_its_routes_cap_is_refused_before_parsing(
    api: Api, project: str, method: str, route: str, size: int
) -> None:
    answer = api.client.request(
        method,
        route.format(p=project),
        headers=api.headers("write") | {"Content-Type": "application/json"},
        content=_features_body(size),
    )
    assert answer.status_code == 413, answer.text[:300]
    assert len(answer.content) < 200


def test_a_streamed_body_without_a_length_is_counted_as_it_arrives(api: Api, project: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"features": [['
        for _ in range(3 * 1024):  # 3 MiB in 1 KiB pieces: past the 1 MiB REST cap
            yield b"0.5," * 256
        yield b"0.5]]}"

    answer = api.client.patch(
        f"/api/v1/projects/{project}",
        headers=api.headers("write") | {"Content-Type": "application/json"},
        content=chunks(),
    )
    assert answer.status_code == 413, answer.text[:300]


def test_a_body_within_the_cap_still_gets_through(api: Api, project: str) -> None:
    # 5 MiB of feature values: past the REST cap, within predict's; refused only because the
    # project has no model yet (404), so the body was read and validated.
    answer = api.client.post(
        f"/api/v1/projects/{project}/predict",
        headers=api.headers("read") | {"Content-Type": "application/json"},
        content=_features_body(5 * MIB),
    )
    assert answer.status_code == 404, answer.text[:300]
    assert "no current model" in answer.text


@pytest.mark.parametrize(
    ("fault", "raw", "status"),
    [
        ("nesting 100,000 deep", b'{"labels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
        ("a 5,001-digit integer", b'{"batch_size": ' + b"7" * 5001 + b"}", 400),
        ("NaN", b'{"loss": {"gamma": NaN}}', 422),
        ("Infinity", b'{"gate": {"eval_fraction": Infinity}}', 422),
        ("a 900 kB string where a number goes", b'{"batch_size": "' + b"x" * 900_000 + b'"}', 422),
    ],
)
def test_malformed_input_is_a_short_4xx_that_echoes_nothing(
    api: Api, project: str, fault: str, raw: bytes, status: int
) -> None:
    write = api.headers("write")
    before = api.client.get(f"/api/v1/projects/{project}", headers=write).json()
    answer = api.client.patch(
        f"/api/v1/projects/{project}",
        headers=write | {"Content-Type": "application/json"},
        content=raw,
    )
    assert answer.status_code == status, (fault, answer.text[:300])
    assert len(answer.content) < 1000, fault
    assert api.client.get(f"/api/v1/projects/{project}", headers=write).json() == before


def test_nan_in_predict_rows_is_refused_by_name(api: Api, project: str) -> None:
    answer = api.client.post(
        f"/api/v1/projects/{project}/predict",
        headers=api.headers("read") | {"Content-Type": "application/json"},
        content=b'{"features": [[0.5, NaN]]}',
    )
    assert answer.status_code == 422, answer.text
    (problem,) = answer.json()["detail"]
    assert problem == {
        "loc": ["body", "features", 0, 1],
        "msg": "Input should be a finite number",
        "type": "finite_number",
    }


def test_a_client_hanging_up_mid_body_is_a_warning_and_stores_nothing(
    engine: sa.Engine, settings: Settings, project: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Label Studio hangs up when a webhook's answer takes past its timeout; that used to be
    # a 500's traceback ("Exception in ASGI application") in the API's log.
    secret = "hang-up-secret"
    settings = settings.model_copy(
        update={
            "webhook_secret": SecretStr(secret),
            "broker_url": f"redis://127.0.0.1:{free_port()}/0",
        }
    )
    server = ApiServer(lambda: create_app(settings, engine=engine), free_port())
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as connection:
            connection.sendall(
                f"POST /api/v1/webhooks/label-studio?project={project} HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nX-Focalloop-Secret: {secret}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                '{"action": "ANNOTATION_CREATED", '.encode()
            )
        wait_for(
            lambda: any("hung up" in record.getMessage() for record in caplog.records),
            timeout_s=10,
            what="the hang-up warning",
        )
        assert httpx.get(f"{server.url}/api/v1/health").status_code == 200
    finally:
        server.stop()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    with db.session_scope(engine) as session:
        project_id = get_project(session, project).id
        stored = select(func.count()).where(col(InboxEvent.project_id) == project_id)
        assert session.exec(stored).one() == 0
