"""`/ready` follows real workers: ready once a worker consumes both queues, not ready within
`heartbeat_stale_s` of the worker being killed (before, it answered 200 with no worker at all)."""

import os
import signal
import time
from collections.abc import Callable

import sqlalchemy as sa
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.config import Settings
from tests.integration.test_workers import Cluster, wait_for


def test_ready_goes_and_comes_with_the_worker(
    state: sa.Engine, worker_settings: Settings, cluster: Callable[..., Cluster]
) -> None:
    settings = worker_settings.model_copy(update={"heartbeat_stale_s": 8.0})
    running = cluster()
    with TestClient(create_app(settings, engine=state)) as client:

        def ready() -> bool:
            return bool(client.get("/api/v1/ready").json()["ready"])

        assert not ready()
        worker = running.worker()
        wait_for(ready, timeout=60, what="ready with a worker", logs=running)
        os.killpg(worker.pid, signal.SIGKILL)  # the machine it ran on is gone
        worker.wait(timeout=10)
        killed = time.monotonic()
        wait_for(lambda: not ready(), timeout=20, what="not ready", logs=running)
        silent_for = time.monotonic() - killed
        print(f"not ready {silent_for:.1f} s after the worker was killed")
        assert silent_for <= settings.heartbeat_stale_s + 2, silent_for
        running.worker(name="replacement")
        wait_for(ready, timeout=60, what="ready again", logs=running)
