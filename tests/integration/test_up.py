"""`focalloop up` as a new user runs it: a fresh data dir, the digits demo, a model and its
metrics visible through the API, and everything stopped by one signal."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.config import Settings, child_environment
from tests.integration.conftest import free_port, unavailable

pytestmark = pytest.mark.slow
UP = [sys.executable, "-m", "services.cli", "up"]


class Up:
    """A running `focalloop up` and its terminal output."""

    def __init__(self, tmp_path: Path, *args: str, path: str | None = None) -> None:
        self.port = free_port()
        self.data = tmp_path / "data"
        # Beat checks every 2 s instead of every minute, so cycles follow each other quickly.
        settings = Settings(data_dir=self.data, schedule_interval_s=2.0)
        environment = child_environment(settings)
        environment.pop("REDIS_URL", None)
        if path is not None:
            environment["PATH"] = path
        self.output = tmp_path / "up.out"
        self.process = subprocess.Popen(
            [*UP, "--port", str(self.port), *args],
            env=environment,
            stdout=self.output.open("wb"),
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"up exited with {self.process.returncode}:\n{self.text()}")
            try:
                value = predicate()
            except (httpx.HTTPError, OSError):
                value = None
            if value:
                return value
            time.sleep(1)
        logs = "".join(
            f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted((self.data / "logs").glob("*.log"))
        )
        raise AssertionError(f"timed out waiting for {what}:\n{self.text()}{logs}")

    def get(self, path: str) -> httpx.Response:
        token = (self.data / "admin-token").read_text().strip()
        return httpx.get(f"{self.url}{path}", headers={"Authorization": f"Bearer {token}"})

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=90)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for up in started:
        if up.process.poll() is None:
            up.process.kill()
            up.process.wait()


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex((host, port)) == 0


def _command_lines() -> str:
    """Every process's command line, as `ps` shows them to any user (read whole, untruncated)."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue  # the process ended meanwhile
    return "\n".join(lines)


def _non_loopback_address() -> str:
    """This machine's address on its main network interface (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError as error:
            unavailable(f"no network interface to check Label Studio's binding against: {error}")
        address = str(probe.getsockname()[0])
    if address.startswith("127."):
        unavailable("no non-loopback address to check Label Studio's binding against")
    return address


def _first_model(up: Up) -> dict[str, Any] | None:
    answer = up.get("/api/v1/projects/digits/models")
    models = answer.json() if answer.status_code == 200 else []
    return models[-1] if models else None


def test_up_runs_the_whole_loop_on_a_private_redis(tmp_path: Path, running: list[Up]) -> None:
    up = Up(tmp_path)
    running.append(up)
    up.wait_for("the admin token", lambda: (up.data / "admin-token").is_file(), 120)
    model = up.wait_for("a first model", lambda: _first_model(up), 300)
    # The first cycle is a cold start, which asks for no evaluation label (nothing to judge
    # yet): the first model is promoted as such, with no held-out figures to show.
    assert model["version"] == 1 and model["summary"] is None
    assert model["promotion_reason"] == "promoted: first model (no evaluation items yet)"
    metrics = httpx.get(f"{up.url}/metrics").text
    assert re.search(r'^focalloop_model_version\{project="digits"\} [1-9]', metrics, re.M)
    # The terminal follows the loop, one line per project (reprinted as it changes, since
    # this terminal is a file).
    up.wait_for(
        "the live status line of the first model",
        lambda: re.search(r"^digits · cycle #\d+ .* · m1 · \d+ open tasks$", up.text(), re.M),
        60,
    )
    text = up.text()
    assert "focalloop is up" in text and "a private redis-server" in text
    # The banner's first address is the console, which asks for a token before anything else.
    console_url = re.search(r"^  console +(\S+) ", text, re.M).group(1)  # type: ignore[union-attr]
    assert httpx.get(console_url, follow_redirects=True).url.path == "/console/sign-in"
    redis_port = int(re.search(r"redis-server on 127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
    assert up.stop(signal.SIGINT) == 0
    # Ctrl-C took everything down: the API, the private redis-server, the worker and beat.
    assert not _listening(up.port) and not _listening(redis_port)
    left = subprocess.run(
        ["pgrep", "-f", str(up.data)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert [pid for pid in left if int(pid) != os.getpid()] == []


def test_up_without_redis_runs_the_loop_in_process(tmp_path: Path, running: list[Up]) -> None:
    empty = tmp_path / "no-redis-on-this-path"
    empty.mkdir()
    up = Up(tmp_path, path=str(empty))
    running.append(up)
    up.wait_for("the summary", lambda: "focalloop is up" in up.text(), 120)
    assert "the loop runs in this process" in up.text()
    model = up.wait_for("a first model", lambda: _first_model(up), 300)
    assert model["version"] == 1
    cycles = up.get("/api/v1/projects/digits/cycles").json()
    assert cycles[-1]["trigger"] == "first cycle" and cycles[-1]["state"] == "done"
    assert (up.data / "logs" / "up.log").read_text().startswith("{")
    assert up.stop(signal.SIGTERM) == 0
    assert not _listening(up.port)


def test_up_with_label_studio_puts_the_hardest_digits_in_front_of_a_person(
    tmp_path: Path, running: list[Up]
) -> None:
    label_studio_port = free_port()
    up = Up(tmp_path, "--with-label-studio", "--label-studio-port", str(label_studio_port))
    running.append(up)
    up.wait_for("the summary", lambda: "focalloop is up" in up.text(), 420)
    assert f"Label Studio at http://127.0.0.1:{label_studio_port}" in up.text()

    def queued() -> int:
        answer = up.get("/api/v1/projects/digits/queue")
        return int(answer.json()["queued"]) if answer.status_code == 200 else 0

    assert up.wait_for("20 tasks in Label Studio", lambda: queued() == 20 or None, 300)
    project = up.get("/api/v1/projects/digits").json()
    assert project["labeler"] == "label_studio"
    from labeling.label_studio.gateway import LabelStudioGateway
    from labeling.label_studio.server import CREDENTIALS_FILE

    # Random credentials, readable by their owner only; never on Label Studio's command line.
    credentials_file = up.data / "label-studio" / CREDENTIALS_FILE
    assert str(credentials_file) in up.text().replace("\n", "")
    assert credentials_file.stat().st_mode & 0o077 == 0
    credentials = json.loads(credentials_file.read_text())
    assert credentials["password"] != "focalloop-admin-password"
    command_lines = _command_lines()
    assert "label-studio" in command_lines
    assert credentials["password"] not in command_lines
    assert credentials["token"] not in command_lines
    # Label Studio listens on loopback only.
    assert _listening(label_studio_port)
    assert not _listening(label_studio_port, host=_non_loopback_address())
    gateway = LabelStudioGateway(
        f"http://127.0.0.1:{label_studio_port}", credentials["token"], timeout_s=30
    )
    tasks = list(gateway.list_tasks(_label_studio_project_id(up)))
    assert len(tasks) == 20
    assert up.stop(signal.SIGINT) == 0
    assert not _listening(label_studio_port)


def _label_studio_project_id(up: Up) -> int:
    from sqlmodel import select

    from services import db
    from services.models import Project

    engine = db.make_engine(f"sqlite:///{up.data / 'focalloop.db'}")
    with db.session_scope(engine) as session:
        labeler = session.exec(select(Project.labeler).where(Project.name == "digits")).one()
    engine.dispose()
    return int(labeler["project_id"])
