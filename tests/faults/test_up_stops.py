"""`focalloop up` stops promptly and leaves nothing behind: Ctrl-C in the middle of a training
ends `up` and everything it started within 30 s (the goal is 15 s; it used to take over 90 s on a
loaded machine, stopping its children one by one and waiting for the training), and a killed
`up` takes its children with it (they were found running 15 minutes later). Each test kills
whatever is left of the processes it saw, even when it fails, so a failure leaves no orphans
behind to slow the rest of the run."""

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_up import Up

pytestmark = pytest.mark.slow
CHILDREN = {"redis-server", "api", "worker", "beat"}


@dataclass(frozen=True)
class Proc:
    """A process as it was seen: its start time tells it from a later one with the same pid."""

    pid: int
    started: int
    command: str

    def alive(self) -> bool:
        """Still running (a zombie has stopped: only its exit status waits to be collected)."""
        seen = _stat(self.pid)
        return seen is not None and seen[2] == self.started and seen[1] != "Z"


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) from /proc/<pid>/stat, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name, in parentheses, may hold spaces: the fields follow its last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], int(fields[19])


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def descendants(root: int) -> set[Proc]:
    """Every live process below `root` (children, grandchildren such as a worker's pool)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (seen := _stat(int(entry.name))) is not None:
            parents.setdefault(seen[0], []).append(int(entry.name))
    found: set[Proc] = set()
    below = list(parents.get(root, []))
    while below:
        pid = below.pop()
        below.extend(parents.get(pid, []))
        seen = _stat(pid)
        if seen is not None and seen[1] != "Z":
            found.add(Proc(pid, seen[2], _command(pid)))
    return found


@dataclass
class Watched:
    """The `up`s a test started and every process seen below them, all killed at teardown."""

    ups: list[Up] = field(default_factory=list)
    seen: set[Proc] = field(default_factory=set)

    def look(self, up: Up) -> set[Proc]:
        found = descendants(up.process.pid)
        self.seen |= found
        return found

    def kill_all(self) -> None:
        for up in self.ups:
            if up.process.poll() is None:
                self.look(up)
                up.process.kill()
                up.process.wait()
        for proc in self.seen:
            if proc.alive():
                os.kill(proc.pid, signal.SIGKILL)


@pytest.fixture
def watched() -> Iterator[Watched]:
    processes = Watched()
    try:
        yield processes
    finally:
        processes.kill_all()


def _poll(up: Up, what: str, predicate: Callable[[], Any], timeout: float) -> Any:
    """Like Up.wait_for, but checks five times a second: a training lasts a few seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and up.process.poll() is None:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    return up.wait_for(what, predicate, timeout=0)  # raises with up's output and its logs


def _cycle_in_training(up: Up) -> int | None:
    """The id of a cycle now training, read from the state database (SQLite, under the data
    dir): quicker than the API, and what the worker writes."""
    database = up.data / "focalloop.db"
    if not database.is_file():
        return None
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as db:
        try:
            row = db.execute(
                "SELECT id FROM cycle WHERE state = 'training' ORDER BY id DESC LIMIT 1"
            ).fetchone()
        except sqlite3.OperationalError:  # not migrated yet, or busy
            return None
    return int(row[0]) if row else None


def _cycle_state(up: Up, cycle_id: int) -> str:
    with closing(sqlite3.connect(f"file:{up.data / 'focalloop.db'}?mode=ro", uri=True)) as db:
        return str(db.execute("SELECT state FROM cycle WHERE id = ?", (cycle_id,)).fetchone()[0])


def _names(processes: set[Proc]) -> set[str]:
    """Which of up's children these are, by their command lines."""
    roles = ("redis-server", " api ", " worker ", " beat ")
    return {role.strip() for role in roles for p in processes if role in f"{p.command} "}


def _wait_gone(processes: set[Proc], timeout: float) -> set[Proc]:
    deadline = time.monotonic() + timeout
    while (left := {p for p in processes if p.alive()}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.timeout(480)
def test_ctrl_c_mid_training_stops_up_and_all_it_started(
    tmp_path: Path, watched: Watched, record_property: Callable[[str, object], None]
) -> None:
    up = Up(tmp_path)
    watched.ups.append(up)
    cycle = _poll(up, "a cycle in training", lambda: _cycle_in_training(up), 360)
    before = watched.look(up)
    assert _names(before) == CHILDREN, before
    sent = time.monotonic()
    up.process.send_signal(signal.SIGINT)
    try:
        returncode = up.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"up still running 30 s after Ctrl-C:\n{up.text()}")
    stopped_s = time.monotonic() - sent
    record_property("stop_s", round(stopped_s, 1))
    print(f"up stopped {stopped_s:.1f} s after Ctrl-C in the middle of a training")
    assert returncode == 0, up.text()
    # Killed processes may take a moment to be gone; none may outlive `up` by more than that.
    assert _wait_gone(before, timeout=2) == set()
    # It stopped in the middle of the training: nothing finished it on the way out (the task
    # went back on the queue, for the next `up`).
    assert _cycle_state(up, cycle) == "training"


@pytest.mark.timeout(300)
def test_a_killed_up_takes_everything_it_started_with_it(tmp_path: Path, watched: Watched) -> None:
    up = Up(tmp_path)
    watched.ups.append(up)
    up.wait_for("the summary", lambda: "focalloop is up" in up.text(), 180)

    def all_children() -> set[Proc] | None:
        found = watched.look(up)
        return found if _names(found) == CHILDREN else None

    children = _poll(up, "up's children", all_children, 60)
    up.process.kill()  # no handler runs: only the kernel's parent-death signal is left
    up.process.wait()
    left = _wait_gone(children, timeout=15)
    assert left == set(), f"still running 15 s after up was killed: {left}"
