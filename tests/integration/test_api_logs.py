"""What `focalloop api` writes about requests, run as a real process: nothing by default, and
with the access log on, no query value (a token passed as `?token=`, a media link's signature)
ever reaches the log."""

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services import db
from services.config import Settings, child_environment
from tests.integration.conftest import free_port

SECRET_TOKEN = "flt_" + "s3cr3t" * 8
SIGNATURE = "ab" * 32


def serve_and_call(tmp_path: Path, *flags: str) -> str:
    """Start `focalloop api` with `flags`, make requests that carry secrets in their query, stop
    it, and return everything it wrote."""
    settings = Settings(data_dir=tmp_path / "data", broker_url=f"redis://127.0.0.1:{free_port()}/0")
    engine = db.engine_from_settings(settings)
    db.upgrade(engine)
    engine.dispose()
    port = free_port()
    output = tmp_path / "api.out"
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "api", "--port", str(port), *flags],
        env=child_environment(settings),
        stdout=output.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, output.read_text()
            try:
                httpx.get(f"{url}/api/v1/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, output.read_text()
                time.sleep(0.3)
        answers = [
            httpx.get(f"{url}/api/v1/projects?token={SECRET_TOKEN}", timeout=10),
            httpx.get(
                f"{url}/api/v1/media/demo/1?expires=9999999999&signature={SIGNATURE}", timeout=10
            ),
        ]
        assert [a.status_code for a in answers] == [401, 403]
    finally:
        process.terminate()
        process.wait(timeout=30)
    return output.read_text(errors="replace")


@pytest.mark.parametrize("flags", [(), ("--no-access-log",)])
def test_no_access_lines_unless_asked(tmp_path: Path, flags: tuple[str, ...]) -> None:
    log = serve_and_call(tmp_path, *flags)
    assert "/api/v1/projects" not in log and "/api/v1/media" not in log, log[-2000:]


def test_the_access_log_keeps_paths_and_blanks_query_values(tmp_path: Path) -> None:
    log = serve_and_call(tmp_path, "--access-log")
    assert "GET /api/v1/projects?token=... HTTP/1.1" in log, log[-2000:]
    assert "/api/v1/media/demo/1?expires=...&signature=..." in log, log[-2000:]
    assert SECRET_TOKEN not in log and SIGNATURE not in log
