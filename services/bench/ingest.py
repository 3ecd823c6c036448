"""`focalloop bench ingest`: `events` ANNOTATION_CREATED webhooks in Label Studio's own payload
shape, sent by `senders` threads (one connection each) to a real `focalloop api` process, stored
and enqueued, and ingested by a real `focalloop worker` (queue io) over a private redis-server;
`duplicate_share` of them are sent a second time (Label Studio's redelivery, or a sync of the same
revision). The clock runs from the first send until the database holds every label. lost = items
without their label; duplicated = annotation rows beyond one per annotation. Median of `repeats`.
"""

import contextlib
import json
import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import redis
from psycopg import sql
from pydantic import SecretStr
from sqlmodel import col, func, select

from services import db
from services.bench.labeling import (
    LABELS,
    SECRET,
    TOKEN_ENV,
    features_project,
    plan_tasks,
)
from services.config import Settings, child_environment, process_environment
from services.models import Annotation, Item, LabelTaskState
from services.projects import get_project
from services.servers import FOCALLOOP, free_port

# ----------------------------------------------------------------------------------- ingest


@dataclass(frozen=True)
class IngestBenchResult:
    events: int
    duplicates_sent: int
    senders: int
    api_workers: int
    database: str
    repeats: int
    seconds: float
    events_per_s: float
    lost: int
    duplicated: int
    send_seconds: float  # until the last webhook was answered (stored and enqueued)
    webhook_p50_ms: float
    webhook_p99_ms: float
    runs_s: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def _process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextmanager
def _database(kind: str, folder: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'state.db'}"
        return
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    name = f"focalloop_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _webhook_body(annotation_id: int, task_id: int, item_id: int, label: str) -> dict[str, Any]:
    """An ANNOTATION_CREATED body shaped as Label Studio 1.23 sends it (fields we do not read
    included, so the body size is realistic)."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    result = [
        {"from_name": "label", "to_name": "features", "type": "choices"}
        | {"value": {"choices": [label]}}
    ]
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {
            "id": annotation_id,
            "result": result,
            "was_cancelled": False,
            "ground_truth": False,
            "created_at": now,
            "updated_at": now,
            "lead_time": 3.2,
            "result_count": 1,
            "task": task_id,
            "project": 1,
            "completed_by": 1,
            "updated_by": 1,
        },
        "task": {
            "id": task_id,
            "data": {"focalloop_item": item_id, "focalloop_kind": "label", "focalloop_note": ""},
            "created_at": now,
            "updated_at": now,
            "is_labeled": True,
            "overlap": 1,
            "project": 1,
        },
        "project": {"id": 1, "title": "focalloop bench"},
    }


def _send_all(url: str, bodies: list[dict[str, Any]], senders: int) -> list[float]:
    """Send every body from `senders` threads, one connection each (bodies are encoded before
    the clock starts); returns each request's latency in seconds. A thread per sender measured
    faster than one asyncio httpx client on this 2-core machine (212 vs 127 events/s), where the
    load generator shares the CPU with the API and the worker."""
    errors: list[str] = []
    latencies: list[float] = []
    encoded = [json.dumps(body).encode() for body in bodies]

    def send(share: list[bytes]) -> None:
        headers = {"X-Focalloop-Secret": SECRET, "Content-Type": "application/json"}
        with httpx.Client(headers=headers, timeout=30) as client:
            for body in share:
                start = time.perf_counter()
                response = client.post(url, content=body)
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")

    threads = [threading.Thread(target=send, args=(encoded[i::senders],)) for i in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} webhook sends failed, e.g. {errors[0]}")
    return latencies


def _wait_until_ready(api_url: str, worker_log: Path, timeout_s: float = 120.0) -> None:
    """Both processes up before the clock starts: the API answers its health check and the
    worker has logged that it is ready (its imports would otherwise eat the first seconds)."""
    deadline = time.monotonic() + timeout_s
    api_up = worker_up = False
    while not (api_up and worker_up):
        if time.monotonic() > deadline:
            raise RuntimeError(f"api up: {api_up}, worker up: {worker_up} after {timeout_s} s")
        with contextlib.suppress(httpx.HTTPError):
            api_up = api_up or httpx.get(f"{api_url}/api/v1/health").status_code == 200
        worker_up = worker_up or (worker_log.exists() and "ready." in worker_log.read_text())
        time.sleep(0.1)


def run_ingest_bench(
    *,
    events: int,
    senders: int,
    repeats: int,
    duplicate_share: float,
    database: str,
    api_workers: int = 1,
) -> IngestBenchResult:
    runs: list[float] = []
    send_runs: list[float] = []
    latencies: list[float] = []
    lost_total = duplicated_total = 0
    with tempfile.TemporaryDirectory(prefix="focalloop-bench-ingest-") as tmp:
        folder = Path(tmp)
        port = free_port()
        redis_port = free_port()
        with (
            _database(database, folder) as database_url,
            _process(
                [
                    *("redis-server", "--port", str(redis_port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no", "--dir", str(folder)),
                ],
                process_environment(),
                folder / "redis.log",
            ),
        ):
            settings = Settings(
                data_dir=folder / "data",
                database_url=database_url,
                broker_url=f"redis://127.0.0.1:{redis_port}/0",
                webhook_secret=SecretStr(SECRET),
                api_url=f"http://127.0.0.1:{port}",
            )
            engine = db.engine_from_settings(settings)
            db.upgrade(engine)
            client = redis.Redis(port=redis_port)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            env = child_environment(settings)
            with (
                _process(
                    [FOCALLOOP, "api", "--port", str(port), "--workers", str(api_workers)],
                    env,
                    folder / "api.log",
                ),
                _process(
                    [FOCALLOOP, "worker", "--queues", "io", "--concurrency", "2"],
                    env,
                    folder / "worker.log",
                ),
            ):
                _wait_until_ready(settings.api_url, folder / "worker.log")
                for repeat in range(repeats):
                    name = features_project(engine, settings, folder / f"p{repeat}", events)
                    with db.session_scope(engine) as session:
                        project = get_project(session, name)
                        project.labeler = {
                            "kind": "label_studio",
                            "url": "http://127.0.0.1:9",
                            "token_env": TOKEN_ENV,
                            "project_id": 1,
                            "webhook_id": 1,
                            "view_id": 1,
                        }
                        session.add(project)
                        project_id = project.id or 0
                    item_ids = plan_tasks(engine, name, LabelTaskState.OPEN)
                    # Annotation ids unique across repeats (they key the revisions).
                    base = repeat * events
                    bodies = [
                        _webhook_body(base + k + 1, k + 1, item_id, LABELS[k % 2])
                        for k, item_id in enumerate(item_ids)
                    ]
                    n_duplicates = int(len(bodies) * duplicate_share)
                    rng = np.random.default_rng(repeat)
                    resent = [bodies[int(i)] for i in rng.choice(len(bodies), n_duplicates)]
                    stream = bodies + resent
                    order = rng.permutation(len(stream))
                    stream = [stream[int(i)] for i in order]
                    url = f"{settings.api_url}/api/v1/webhooks/label-studio?project={name}"
                    start = time.perf_counter()
                    latencies.extend(_send_all(url, stream, senders))
                    send_runs.append(time.perf_counter() - start)
                    deadline = time.monotonic() + 600
                    while True:
                        with db.session_scope(engine) as session:
                            stored = session.exec(
                                select(func.count())
                                .select_from(Annotation)
                                .where(Annotation.project_id == project_id)
                            ).one()
                        if stored >= events or time.monotonic() > deadline:
                            break
                        time.sleep(0.02)
                    runs.append(time.perf_counter() - start)
                    with db.session_scope(engine) as session:
                        labeled = session.exec(
                            select(func.count())
                            .select_from(Item)
                            .where(Item.project_id == project_id, col(Item.label).is_not(None))
                        ).one()
                        distinct = session.exec(
                            select(func.count(func.distinct(Annotation.external_id))).where(
                                Annotation.project_id == project_id
                            )
                        ).one()
                        rows = session.exec(
                            select(func.count())
                            .select_from(Annotation)
                            .where(Annotation.project_id == project_id)
                        ).one()
                    lost_total += events - int(labeled)
                    duplicated_total += int(rows) - int(distinct)
            engine.dispose()
    seconds = statistics.median(runs)
    return IngestBenchResult(
        events=events,
        duplicates_sent=int(events * duplicate_share),
        senders=senders,
        api_workers=api_workers,
        database=database,
        repeats=repeats,
        seconds=seconds,
        events_per_s=events / seconds,
        lost=lost_total,
        duplicated=duplicated_total,
        send_seconds=statistics.median(send_runs),
        webhook_p50_ms=1000 * float(np.percentile(latencies, 50)),
        webhook_p99_ms=1000 * float(np.percentile(latencies, 99)),
        runs_s=runs,
    )
