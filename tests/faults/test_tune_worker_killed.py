"""A tuning study on real Celery workers (two trials at once, the coordinator a real `focalloop
tune` process) loses a pool process mid-trial: the lost grid cell runs again, every cell is
accounted for, and --apply sets the project's loss with an audit entry."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import select

from services import db
from services.config import Settings, child_environment
from services.models import AuditEntry
from services.projects import get_project
from tests.conftest import Digits
from tests.integration.test_tune import labeled_project
from tests.integration.test_workers import Cluster

pytestmark = pytest.mark.timeout(420)
FOCALLOOP = str(Path(sys.executable).with_name("focalloop"))
RECEIVED = re.compile(r"Task focalloop\.tune_trial\[[^\]]+\] received")


def _pool_processes(root: int) -> list[int]:
    """The leaves of the process tree under `root` (a Celery worker's pool processes), from
    /proc: `focalloop worker` runs Celery's main process, which forks the pool."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    below = {root}
    while True:
        more = {pid for pid, parent in parents.items() if parent in below} - below
        if not more:
            break
        below |= more
    has_children = set(parents[pid] for pid in below if pid != root)
    return sorted(pid for pid in below - {root} if pid not in has_children)


def test_a_grid_study_on_workers_survives_a_killed_trial_and_applies_the_best(
    state: sa.Engine,
    worker_settings: Settings,
    cluster: Callable[..., Cluster],
    digits: Digits,
    tmp_path: Path,
) -> None:
    name = labeled_project(state, worker_settings, digits, tmp_path / "p")
    running = cluster()
    worker = running.worker(concurrency=2)  # two trials at once
    out = tmp_path / "out"
    coordinator = subprocess.Popen(
        [
            FOCALLOOP,
            "tune",
            name,
            "--gamma",
            "0",
            "--gamma",
            "2",
            "--folds",
            "2",
            "--repeats",
            "1",
            "--out",
            str(out),
            "--apply",
            "--wait",
            "120",
        ],
        env=child_environment(worker_settings, COLUMNS="200"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        # Both pool processes hold a trial (prefetch 1 each) once two have been received.
        while len(RECEIVED.findall(running.log("worker"))) < 2:
            assert time.monotonic() < deadline, running.log("worker")
            assert coordinator.poll() is None, coordinator.communicate()[0]
            time.sleep(0.2)
        pool = _pool_processes(worker.pid)
        assert len(pool) == 2, pool
        os.kill(pool[0], signal.SIGKILL)  # it dies mid-trial
        output = coordinator.communicate(timeout=300)[0].decode()
    finally:
        if coordinator.poll() is None:
            os.killpg(coordinator.pid, signal.SIGKILL)
            coordinator.wait(timeout=10)
    assert coordinator.returncode == 0, output
    log = running.log("worker")
    assert "WorkerLostError" in log or "SIGKILL" in log, log
    summary = json.loads((out / "tuning.json").read_text())
    cells = summary["heatmap"]["cells"]
    assert len(cells) == 6 and summary["failed"] == 0  # the lost cell ran again
    assert {(c["gamma"], c["alpha"]) for c in cells} == {
        (g, a) for g in (0.0, 2.0) for a in ("none", "inverse_frequency", "effective_number")
    }
    assert "best gamma=" in output and "applied to" in output
    best = summary["best"]
    with db.session_scope(state) as session:
        project = get_project(session, name)
        assert project.loss_config["gamma"] == best["gamma"]
        entries = session.exec(select(AuditEntry).where(AuditEntry.action == "project.tune")).all()
        assert [entry.detail["study"] for entry in entries] == [summary["study"]]
