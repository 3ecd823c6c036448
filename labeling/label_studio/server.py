"""A local Label Studio server: installed into its own cached virtualenv (never the project's:
it pins dozens of packages) and started on a loopback port with a fixed admin user and token.

Used by the integration tests, the `bench push` benchmark and local runs. Label Studio must be
allowed to call webhooks on loopback (`SSRF_PROTECTION_ENABLED=false`), and the fixed token is
accepted only with `--enable-legacy-api-token`.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.config import process_environment
from services.servers import die_with_parent

LABEL_STUDIO_VERSION = "1.23.2"
# Seconds Label Studio waits for a webhook's answer (its default: 1). It sends webhooks inside
# the annotator's submit and never retries one, so a busy API past 1 s lost the event until the
# next reconciliation; 5 s rides out a busy moment while still bounding the annotator's wait.
WEBHOOK_TIMEOUT_S = "5"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "focalloop"


def ensure_installed(cache_dir: Path, *, version: str = LABEL_STUDIO_VERSION) -> Path:
    """The `label-studio` executable of a virtualenv under `cache_dir`, installing it first if
    needed (about 1 GB, a few minutes). A lock file makes concurrent callers wait for one
    install; a marker file written last means a half-finished install is redone."""
    venv = cache_dir / f"label-studio-{version}"
    executable = venv / "bin" / "label-studio"
    marker = venv / ".focalloop-complete"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f"label-studio-{version}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and executable.exists():
            return executable
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                f"label-studio=={version}",
            ],
            check=True,
        )
        marker.write_text(version)
    return executable


@dataclass(frozen=True)
class Credentials:
    username: str = "admin@focalloop.local"
    password: str = "focalloop-admin-password"
    token: str = "focalloop0local0label0studio0token"


class LocalLabelStudio:
    """One Label Studio process on 127.0.0.1:`port` with its data under `data_dir`. `owned`:
    it dies with this process (SIGTERM, to its leader, which may end its own helpers), even
    when this one is killed: what `focalloop up` needs so that a dead `up` leaves no server."""

    def __init__(
        self,
        executable: Path,
        *,
        port: int,
        data_dir: Path,
        credentials: Credentials | None = None,
        owned: bool = False,
    ) -> None:
        self.executable = executable
        self.owned = owned
        self.port = port
        self.data_dir = data_dir
        self.credentials = credentials or Credentials()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout_s: float = 300.0) -> None:
        """Start the server and wait until it answers its health check (the first start runs
        Label Studio's migrations: about a minute)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        environment = process_environment(
            LABEL_STUDIO_BASE_DATA_DIR=str(self.data_dir),
            # Webhooks go to focalloop's API, which is on loopback or a private network.
            SSRF_PROTECTION_ENABLED="false",
            WEBHOOK_TIMEOUT=WEBHOOK_TIMEOUT_S,
            LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="false",
        )
        log = (self.data_dir / "label-studio.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(self.executable),
                "start",
                "--no-browser",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--username",
                self.credentials.username,
                "--password",
                self.credentials.password,
                "--user-token",
                self.credentials.token,
                "--enable-legacy-api-token",
            ],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as one
            preexec_fn=die_with_parent(signal.SIGTERM) if self.owned else None,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Label Studio exited with {self.process.returncode}; "
                    f"see {self.data_dir / 'label-studio.log'}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"Label Studio did not become healthy in {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
