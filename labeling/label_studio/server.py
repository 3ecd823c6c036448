"""A local Label Studio server: installed into its own cached virtualenv (never the project's:
it pins dozens of packages) and started on a loopback port with an admin user whose password and
token are random per data directory (kept in a file only its owner can read).

Used by the integration tests, the `bench push` benchmark and `focalloop up`. Label Studio must
be allowed to call webhooks on loopback (`SSRF_PROTECTION_ENABLED=false`), and a token we choose
is accepted only with `--enable-legacy-api-token`. Safe by default: it listens on 127.0.0.1 only
(Label Studio binds 0.0.0.0 unless given `--internal-host`; its `--host` is the public URL, not
the address), the credentials reach it through its environment (never the command line, which
`ps` shows), and its error reporting (Sentry), usage analytics and update check are off.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.config import process_environment
from services.servers import die_with_parent

log = logging.getLogger(__name__)
LABEL_STUDIO_VERSION = "1.23.2"
# Seconds Label Studio waits for a webhook's answer (its default: 1). It sends webhooks inside
# the annotator's submit and never retries one, so a busy API past 1 s lost the event until the
# next reconciliation; 5 s rides out a busy moment while still bounding the annotator's wait.
WEBHOOK_TIMEOUT_S = 5


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
    username: str
    password: str
    token: str

    @classmethod
    def generate(cls) -> Credentials:
        # 40 hex characters: the shape of Label Studio's own tokens.
        return cls("admin@focalloop.local", secrets.token_urlsafe(18), secrets.token_hex(20))

    @classmethod
    def load_or_create(cls, path: Path) -> Credentials:
        """The credentials kept in `path` (JSON), written first (mode 0600, never replaced:
        Label Studio keeps the user it was first started with) when there are none."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written whole under a private name, then linked into place: a reader never sees
            # a half-written file, and of two processes racing, the first link wins.
            draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as file:
                json.dump(cls.generate().__dict__, file)
            try:
                os.link(draft, path)
            except FileExistsError:
                pass  # another process made it first: read theirs
            finally:
                draft.unlink()
        data = json.loads(path.read_text())
        return cls(str(data["username"]), str(data["password"]), str(data["token"]))


CREDENTIALS_FILE = "focalloop-credentials.json"
# What focalloop used before credentials were random. Label Studio applies a token only when it
# creates its user, so a data directory made then keeps them (`local_credentials` warns).
LEGACY_CREDENTIALS = Credentials(
    "admin@focalloop.local", "focalloop-admin-password", "focalloop0local0label0studio0token"
)


# Where `focalloop up` keeps its Label Studio's data, under its own data directory.
UP_LABEL_STUDIO_DIR = "label-studio"


def kept_token(data_dir: Path) -> str | None:
    """The API token of the Label Studio `focalloop up` runs with `data_dir`, or None when it
    never ran one there: what other commands use when no token variable is set."""
    folder = data_dir.expanduser() / UP_LABEL_STUDIO_DIR
    ran = (folder / CREDENTIALS_FILE).is_file() or (folder / "label_studio.sqlite3").is_file()
    return local_credentials(folder).token if ran else None


def local_credentials(data_dir: Path) -> Credentials:
    """The admin credentials of the Label Studio whose data lives in `data_dir`."""
    path = data_dir / CREDENTIALS_FILE
    if not path.exists() and (data_dir / "label_studio.sqlite3").exists():
        log.warning(
            "%s was made with focalloop's old published password and API token: change both "
            "in Label Studio (Account & Settings), or start from a new data directory",
            data_dir,
        )
        return LEGACY_CREDENTIALS
    return Credentials.load_or_create(path)


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
        self.credentials = credentials or local_credentials(data_dir)
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
            # So is the model backend focalloop serves (Label Studio refuses local addresses).
            ML_BLOCK_LOCAL_IP="false",
            WEBHOOK_TIMEOUT=str(WEBHOOK_TIMEOUT_S),
            LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="false",
            LABEL_STUDIO_USERNAME=self.credentials.username,
            LABEL_STUDIO_PASSWORD=self.credentials.password,
            LABEL_STUDIO_USER_TOKEN=self.credentials.token,
            SENTRY_DSN="",
            FRONTEND_SENTRY_DSN="",
            COLLECT_ANALYTICS="false",
            LATEST_VERSION_CHECK="false",
        )
        log = (self.data_dir / "label-studio.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(self.executable),
                "start",
                "--no-browser",
                "--internal-host",
                "127.0.0.1",
                "--port",
                str(self.port),
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
