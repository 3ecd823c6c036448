"""A real Label Studio server per test session and a real uvicorn server for our API.

Registered as a plugin by tests/conftest.py: test modules take `label_studio`, `ls_token` and
`annotator` by name and never import them (an imported fixture would start a server per module).

Label Studio is installed (once, cached under ~/.cache/focalloop) into its own virtualenv and
started on a free loopback port with a fresh data directory; under CI a failure to install or
start it fails the tests that need it.
"""

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
import uvicorn
from sqlmodel import col, func, select
from starlette.types import ASGIApp

from labeling.label_studio.gateway import LabelStudioGateway
from labeling.label_studio.server import LocalLabelStudio, default_cache_dir, ensure_installed
from services import db
from services.models import InboxEvent
from tests.integration.conftest import free_port, unavailable

TOKEN_ENV = "FOCALLOOP_TEST_LABEL_STUDIO_TOKEN"
WEBHOOK_SECRET = "focalloop-test-webhook-secret"


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalLabelStudio]:
    try:
        executable = ensure_installed(default_cache_dir())
    except Exception as error:  # any install failure means the service is unavailable
        unavailable(f"cannot install Label Studio: {error}")
    server = LocalLabelStudio(
        executable, port=free_port(), data_dir=tmp_path_factory.mktemp("label-studio")
    )
    try:
        server.start()
    except RuntimeError as error:
        unavailable(f"cannot start Label Studio: {error}")
    yield server
    server.stop()


@pytest.fixture
def ls_token(label_studio: LocalLabelStudio, monkeypatch: pytest.MonkeyPatch) -> str:
    """The admin token, in the environment variable the project's link names."""
    monkeypatch.setenv(TOKEN_ENV, label_studio.credentials.token)
    return label_studio.credentials.token


@pytest.fixture
def annotator(label_studio: LocalLabelStudio, ls_token: str) -> LabelStudioGateway:
    """Label Studio's API as an annotator in the browser would use it."""
    return LabelStudioGateway(label_studio.url, ls_token)


class ApiServer:
    """Our app (FastAPI, or a wrapper around it) under a real uvicorn server in a thread;
    stop() and start() again simulate the API being down."""

    def __init__(self, make_app: Callable[[], ASGIApp], port: int) -> None:
        self.make_app = make_app
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = uvicorn.Config(
            self.make_app(), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=20)
            self._server = None


def api_server(make_app: Callable[[], ASGIApp], port: int) -> Iterator[ApiServer]:
    server = ApiServer(make_app, port)
    server.start()
    yield server
    server.stop()


def inbox_count(engine: sa.Engine, project_id: int) -> int:
    with db.session_scope(engine) as session:
        return int(
            session.exec(
                select(func.count())
                .select_from(InboxEvent)
                .where(col(InboxEvent.project_id) == project_id)
            ).one()
        )


def wait_for(
    condition: Callable[[], bool], *, timeout_s: float = 30.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


__all__ = [
    "TOKEN_ENV",
    "WEBHOOK_SECRET",
    "ApiServer",
    "annotator",
    "api_server",
    "inbox_count",
    "label_studio",
    "ls_token",
    "wait_for",
]
