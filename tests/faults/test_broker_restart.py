"""A Redis restart that loses every queued message, mid-task. Before, the worker died with
kombu's `AttributeError: 'NoneType' object has no attribute 'hostname'` the moment the
connection dropped while a task ran and a pool slot waited for work; the cycle then sat for
minutes, and events received during the outage were never ingested.

Now the worker carries on (workers/app.py's workaround), and the first recovery after the broker
comes back empty re-enqueues every open piece of work from the database at once."""

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import col, func, select

from labeling.label_studio.link import SOURCE
from services import db
from services.config import Settings
from services.models import InboxEvent
from services.projects import get_project
from tests.conftest import Digits
from tests.integration.conftest import PrivateRedis
from tests.integration.cycle_helpers import make_digits_project, selected_items
from tests.integration.test_poison import body, open_tasks
from tests.integration.test_workers import (
    Cluster,
    prepare_scoring_cycle,
    state_of,
    train_until_a_chunk_is_mid_task,
    wait_for,
)

OUTAGE_S = 30
RECOVERY_BUDGET_S = 60


def unprocessed(engine: sa.Engine) -> int:
    with db.session_scope(engine) as session:
        return int(
            session.exec(
                select(func.count())
                .select_from(InboxEvent)
                .where(col(InboxEvent.processed_at).is_(None))
            ).one()
        )


def test_a_redis_restart_that_loses_the_queues_mid_task(
    state: sa.Engine,
    worker_settings: Settings,
    private_redis: PrivateRedis,
    cluster: Callable[..., Cluster],
    digits: Digits,
    tmp_path: Path,
) -> None:
    # One score chunk, slowed down: while it runs, the worker's other pool slot waits on the
    # queue, which is when the lost connection used to kill the worker.
    settings = worker_settings.model_copy(update={"pool_shard_items": 10_000})
    project, cycle_id = prepare_scoring_cycle(state, settings, digits, tmp_path / "p")
    labeled_elsewhere = make_digits_project(state, settings, digits, tmp_path / "q", n_items=8)
    tasks = open_tasks(state, labeled_elsewhere.name)
    running = cluster(FOCALLOOP_DEBUG_CHUNK_DELAY_S="8")
    worker = running.worker()
    running.beat()
    train_until_a_chunk_is_mid_task(state, settings, running, cycle_id)

    private_redis.kill()
    for leftover in private_redis.folder.iterdir():  # restarted without its data
        if leftover.name != "redis.log":
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    # Webhooks stored by the API during the outage (its doorbell to ingest cannot ring).
    with db.session_scope(state) as session:
        project_id = get_project(session, labeled_elsewhere.name).id
        for number, (task_id, item_id) in enumerate(tasks):
            session.add(
                InboxEvent(
                    source=SOURCE,
                    event_key=f"outage-{number}",
                    action="ANNOTATION_CREATED",
                    project_id=project_id,
                    payload=body(500 + number, task_id, item_id),
                )
            )
    time.sleep(OUTAGE_S)
    assert worker.poll() is None, "the worker died when Redis went away\n" + running.log("worker")
    private_redis.start()
    back = time.monotonic()

    wait_for(
        lambda: state_of(state, cycle_id) == "done" and unprocessed(state) == 0,
        timeout=RECOVERY_BUDGET_S,
        what="the cycle done and every event ingested",
        logs=running,
    )
    print(f"recovered {time.monotonic() - back:.1f} s after Redis returned")
    assert worker.poll() is None, running.log("worker")
    picked = selected_items(state, project.name)
    assert len(picked) == len(set(picked)) == 40
