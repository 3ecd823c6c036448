"""`focalloop bench annotator`: does the annotator wait? A fresh `focalloop up --with-label-studio`
(the digits demo, beat at its default interval), and one annotator answering through Label
Studio's API what "Label All Tasks" serves next (`/api/projects/{id}/next/`), one answer every
`pace_s` seconds, with the true digit, until the tasks of `batches` batches are answered.

Measured from the annotator's side (Label Studio's own counts, polled every `POLL_S`):

    first_task_s     `up` started -> the first task is served (Label Studio's start included)
    idle_s           seconds the annotator asked for a task and got none, from the first task's
                     arrival to the last answer of batch `batches`
    refill_s         per batch after the first: the answer that started its cycle (the last one
                     before the cycle's start) -> the batch's tasks visible in Label Studio
    open_at_arrival  per batch after the first: tasks still waiting when it arrived (0: the
                     annotator had run dry)

Arms, each a fresh deployment: `refill` (the defaults: the queue is refilled under one batch of
open tasks, and each ingest and the worker's start ask for due cycles at once) and `beat-only`
(the code's behaviour before: `refill_below` 0 and `start_due_cycles_at_once` off, so only
beat's tick starts a cycle: the first one interval after beat starts, the next ones after enough
new labels), the baseline of the same run.
"""

import json
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import sqlalchemy as sa
from sklearn.datasets import load_digits

from labeling.label_studio.gateway import LabelStudioGateway
from labeling.label_studio.payloads import ITEM_KEY
from labeling.label_studio.server import CREDENTIALS_FILE, UP_LABEL_STUDIO_DIR
from services.config import Settings, child_environment
from services.servers import FOCALLOOP, free_port

POLL_S = 0.25
# Task-count increases closer together than this are one batch (a hand-off imports in chunks).
SAME_BATCH_S = 5.0
ARMS = ("refill", "beat-only")


@dataclass
class Timeline:
    """What the annotator saw, in seconds since `up` started."""

    answers: list[float] = field(default_factory=list)
    arrivals: list[tuple[float, int, int]] = field(default_factory=list)  # (t, tasks, open)
    idle_s: float = 0.0
    first_task_s: float | None = None


@dataclass(frozen=True)
class AnnotatorRun:
    arm: str
    batches: int
    answers: int
    pace_s: float
    first_task_s: float
    idle_s: float
    refill_s: list[float]
    open_at_arrival: list[int]
    cycles: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Deployment:
    """`focalloop up --with-label-studio` in a temporary data dir, stopped on exit."""

    def __init__(self, folder: Path, settings: Settings, *, arm: str) -> None:
        self.folder = folder
        self.port, self.label_studio_port = free_port(), free_port()
        update: dict[str, Any] = {"data_dir": folder / "data"}
        if arm == "beat-only":
            update["start_due_cycles_at_once"] = False
        environment = child_environment(settings.model_copy(update=update))
        environment.pop("REDIS_URL", None)  # up starts its own redis-server
        self.arm = arm
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [
                *(FOCALLOOP, "up", "--with-label-studio", "--port", str(self.port)),
                *("--label-studio-port", str(self.label_studio_port)),
            ],
            env=environment,
            stdout=(folder / "up.out").open("wb"),
            stderr=subprocess.STDOUT,
        )

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def since_start(self) -> float:
        return time.monotonic() - self.started

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        token = (self.data / "admin-token").read_text().strip()
        return httpx.request(
            method,
            f"http://127.0.0.1:{self.port}/api/v1{path}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            **kwargs,
        )

    def wait_until_up(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"up exited:\n{(self.folder / 'up.out').read_text()[-3000:]}")
            if "focalloop is up" in (self.folder / "up.out").read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise RuntimeError("up did not start in time")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def deployed(settings: Settings, arm: str) -> Iterator[Deployment]:
    with tempfile.TemporaryDirectory(prefix="focalloop-bench-annotator-") as folder:
        deployment = Deployment(Path(folder), settings, arm=arm)
        try:
            yield deployment
        finally:
            deployment.stop()


def _truth(deployment: Deployment) -> dict[int, str]:
    """Our item id -> the true digit (the demo's items are named digit-NNNN by dataset row)."""
    targets = load_digits().target
    engine = sa.create_engine(f"sqlite:///{deployment.data / 'focalloop.db'}")
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT id, external_id FROM item")).all()
    finally:
        engine.dispose()
    return {int(item_id): str(int(targets[int(name.split("-")[1])])) for item_id, name in rows}


def _poll_counts(
    gateway: LabelStudioGateway,
    project_id: int,
    deployment: Deployment,
    timeline: Timeline,
    stop: threading.Event,
) -> None:
    """Record each rise of Label Studio's task count: (when, tasks, tasks still open before)."""
    seen = 0
    open_before = 0
    while not stop.is_set():
        try:
            tasks, finished = gateway.task_counts(project_id)
        except Exception:  # a slow answer under load: the next poll tells
            stop.wait(POLL_S)
            continue
        if tasks > seen:
            timeline.arrivals.append((deployment.since_start(), tasks, open_before))
            seen = tasks
        open_before = tasks - finished
        stop.wait(POLL_S)


def _batches(arrivals: list[tuple[float, int, int]]) -> list[tuple[float, int, int]]:
    """Rises of the task count grouped into batches: (first rise, tasks after, open before)."""
    grouped: list[tuple[float, int, int]] = []
    for when, tasks, open_before in arrivals:
        if grouped and when - grouped[-1][0] < SAME_BATCH_S:
            grouped[-1] = (grouped[-1][0], tasks, grouped[-1][2])
        else:
            grouped.append((when, tasks, open_before))
    return grouped


def annotate(deployment: Deployment, batches: int, pace_s: float, timeout_s: float) -> Timeline:
    """Answer what Label Studio serves next, every `pace_s`, until every task of the first
    `batches` batches is answered."""
    credentials = json.loads((deployment.data / UP_LABEL_STUDIO_DIR / CREDENTIALS_FILE).read_text())
    gateway = LabelStudioGateway(
        f"http://127.0.0.1:{deployment.label_studio_port}", credentials["token"], timeout_s=30
    )
    project = deployment.api("GET", "/projects/digits").json()
    if deployment.arm == "beat-only":
        deployment.api("PATCH", "/projects/digits", json={"refill_below": 0}).raise_for_status()
    project_id = int(_label_studio_project(deployment))
    truth = _truth(deployment)
    timeline = Timeline()
    stop = threading.Event()
    poller = threading.Thread(
        target=_poll_counts, args=(gateway, project_id, deployment, timeline, stop), daemon=True
    )
    poller.start()
    deadline = time.monotonic() + timeout_s
    waiting_since: float | None = None
    try:
        while time.monotonic() < deadline:
            grouped = _batches(timeline.arrivals)
            if len(grouped) > batches and len(timeline.answers) >= grouped[batches - 1][1]:
                return timeline
            task = gateway.next_task(project_id)
            now = deployment.since_start()
            if task is None:
                waiting_since = now if waiting_since is None else waiting_since
                time.sleep(POLL_S)
                continue
            if timeline.first_task_s is None:
                timeline.first_task_s = now
            elif waiting_since is not None:
                timeline.idle_s += now - waiting_since
            waiting_since = None
            label = truth[int(task["data"][ITEM_KEY])]
            gateway.annotate(int(task["id"]), label, modality=str(project["modality"]))
            timeline.answers.append(deployment.since_start())
            time.sleep(max(0.0, pace_s - (deployment.since_start() - now)))
        raise RuntimeError(f"{batches} batches were not answered within {timeout_s} s")
    finally:
        stop.set()
        poller.join(timeout=5)


def _label_studio_project(deployment: Deployment) -> int:
    engine = sa.create_engine(f"sqlite:///{deployment.data / 'focalloop.db'}")
    try:
        with engine.connect() as connection:
            labeler = connection.execute(
                sa.text("SELECT labeler FROM project WHERE name = 'digits'")
            ).scalar_one()
    finally:
        engine.dispose()
    return int(json.loads(labeler)["project_id"])


def _cycle_starts(deployment: Deployment) -> list[float]:
    """Each cycle's start, in seconds since `up` started (the API's clock is this machine's)."""
    cycles = deployment.api("GET", "/projects/digits/cycles?limit=200").json()
    offset = time.time() - deployment.since_start()
    return sorted(
        datetime.fromisoformat(str(cycle["created_at"])).timestamp() - offset for cycle in cycles
    )


def run_arm(
    settings: Settings, arm: str, *, batches: int, pace_s: float, timeout_s: float
) -> AnnotatorRun:
    with deployed(settings, arm) as deployment:
        deployment.wait_until_up()
        timeline = annotate(deployment, batches, pace_s, timeout_s)
        starts = _cycle_starts(deployment)
    grouped = _batches(timeline.arrivals)[:batches]
    refill = []
    for arrival, _, _ in grouped[1:]:
        started = max((s for s in starts if s <= arrival), default=None)
        if started is None:
            continue
        answered = [a for a in timeline.answers if a <= started]
        if answered:
            refill.append(arrival - answered[-1])
    return AnnotatorRun(
        arm=arm,
        batches=batches,
        answers=len(timeline.answers),
        pace_s=pace_s,
        first_task_s=timeline.first_task_s or float("nan"),
        idle_s=timeline.idle_s,
        refill_s=refill,
        open_at_arrival=[open_before for _, _, open_before in grouped[1:]],
        cycles=len(starts),
    )


def summary(runs: list[AnnotatorRun]) -> dict[str, dict[str, float]]:
    """Per arm: medians over runs of idle and first-task time, p50/p95 of every refill."""
    table: dict[str, dict[str, float]] = {}
    for arm in sorted({run.arm for run in runs}):
        mine = [run for run in runs if run.arm == arm]
        refills = [value for run in mine for value in run.refill_s]
        table[arm] = {
            "runs": len(mine),
            "median_idle_s": statistics.median(run.idle_s for run in mine),
            "max_idle_s": max(run.idle_s for run in mine),
            "median_first_task_s": statistics.median(run.first_task_s for run in mine),
            "refill_p50_s": float(np.percentile(refills, 50)) if refills else float("nan"),
            "refill_p95_s": float(np.percentile(refills, 95)) if refills else float("nan"),
            "batches_arriving_to_an_empty_queue": sum(
                1 for run in mine for waiting in run.open_at_arrival if waiting == 0
            ),
        }
    return table


def bench_annotator(
    settings: Settings,
    *,
    batches: int = 5,
    pace_s: float = 2.0,
    repeats: int = 1,
    arms: tuple[str, ...] = ARMS,
    timeout_s: float = 1800,
) -> list[AnnotatorRun]:
    """`repeats` runs of each arm, alternating arms (a slower minute hits both alike)."""
    return [
        run_arm(settings, arm, batches=batches, pace_s=pace_s, timeout_s=timeout_s)
        for _ in range(repeats)
        for arm in arms
    ]
