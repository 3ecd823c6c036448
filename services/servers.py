"""Private helper servers on loopback: a free port, and a `redis-server` of our own (for
`focalloop up`, the benchmarks and the tests' fault drills, which must never touch the
machine's shared Redis)."""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from services.config import process_environment

# The `focalloop` command of this interpreter's environment (what benchmarks start).
FOCALLOOP = str(Path(sys.executable).with_name("focalloop"))
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A `preexec_fn` after which the kernel sends the child `sig` when this process dies, even
    by SIGKILL, so that nothing it started outlives it (a killed `focalloop up` used to leave its
    redis-server, API, worker and beat running for good). Linux only (prctl); None elsewhere,
    and those children then live on until stopped, as before.

    The signal follows the thread that started the child: call it from one that lives as long
    as the process (the main thread). A preexec function makes subprocess fork rather than
    spawn, which is fine for the few children of a command like `up`."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        # In the child between fork and exec; the setting survives the exec.
        if prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig)) != 0:
            return  # refused: the child still stops with the parent's stop path
        # The parent may have died before the line above, and then no signal is coming.
        if os.getppid() != parent:
            os._exit(1)

    return set_parent_death_signal


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """`redis-server` on 127.0.0.1:`port`, its files and log in `folder`. `append_only` keeps
    queued tasks across a restart of the server (what the deployment runs with). `owned` puts it
    in a process group of its own and has it die with this process (SIGTERM, which flushes the
    append-only file), even when this one is killed: what `focalloop up` needs, so that its
    terminal's Ctrl-C reaches `up` alone and a dead `up` leaves no server behind."""

    def __init__(
        self,
        folder: Path,
        *,
        port: int | None = None,
        append_only: bool = True,
        owned: bool = False,
    ) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.append_only = append_only
        self.owned = owned
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, timeout_s: float = 10.0) -> None:
        """Start it and wait until it answers PING. FileNotFoundError when the binary is not on
        the PATH; RuntimeError when it does not answer in time."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "yes" if self.append_only else "no"),
                *("--dir", str(self.folder), "--daemonize", "no"),
            ],
            env=process_environment(),
            stdout=(self.folder / "redis.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=self.owned,
            preexec_fn=die_with_parent(signal.SIGTERM) if self.owned else None,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout_s:.0f} s")

    def stop(self) -> None:
        """Shut it down cleanly (SIGTERM; an append-only file is flushed)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: a crash, for fault drills."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
