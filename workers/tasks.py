"""Thin task adapters: ids in -> one call into `services.cycles` -> enqueue what it returned.

Every task is safe to run twice: the services functions claim work with conditional UPDATEs and
fence completions with attempt numbers, so a redelivered message finds nothing to do. Retries
are Celery's (`autoretry_for=TransientError`); failures that retrying cannot fix are recorded on
the cycle by the services layer with their reason.
"""

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, cast

import sqlalchemy as sa
from celery.signals import task_postrun, task_prerun, worker_process_init

from services import cycles, labelstudio, logs
from services.config import Settings, get_settings
from services.datasets.snapshot import snapshot as commit_snapshot
from services.db import engine_from_settings, session_scope
from services.errors import TransientError
from services.projects import get_project
from workers.app import app

log = logging.getLogger("focalloop.workers")
_ENGINE: sa.Engine | None = None


def settings() -> Settings:
    return get_settings()


def engine() -> sa.Engine:
    """This process's engine, created on first use (after the fork, never inherited)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = engine_from_settings(settings())
    return _ENGINE


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _fresh_process(**_: Any) -> None:
    # A forked pool child must not reuse the parent's connections (or touch CUDA before fork:
    # nothing here initializes it, and torch only does on first use in the child).
    global _ENGINE
    if _ENGINE is not None:
        _ENGINE.dispose(close=False)
    _ENGINE = None
    threads = settings().torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)


@task_prerun.connect  # type: ignore[untyped-decorator]
def _bind_task(task_id: str, task: Any, **_: Any) -> None:
    # Every log line of the task carries its id and name; the cycle code adds project and cycle.
    logs.clear()
    logs.bind(task_id=task_id, task=task.name)


@task_postrun.connect  # type: ignore[untyped-decorator]
def _unbind_task(**_: Any) -> None:
    logs.clear()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


P = ParamSpec("P")


class TaskHandle(Protocol[P]):
    """A registered task as the code uses it: call it in-process, or `.delay` it (typed)."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> None: ...

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...


def task(name: str) -> Callable[[Callable[P, None]], TaskHandle[P]]:
    """Register `function` as Celery task `name` with the retry policy below (Celery itself
    is untyped; this keeps the tasks' signatures checked)."""

    def register(function: Callable[P, None]) -> TaskHandle[P]:
        return cast(TaskHandle[P], app.task(name=name, **RETRYING)(function))

    return register


RETRYING: dict[str, Any] = {
    "autoretry_for": (TransientError,),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": False,
    "max_retries": 8,
}


@task("focalloop.train")
def train(cycle_id: int) -> None:
    outcome = cycles.train_cycle(engine(), cycle_id, settings())
    for chunk_id in outcome.chunk_ids:
        score_chunk.delay(chunk_id)
    if outcome.select:
        select.delay(cycle_id)


@task("focalloop.score_chunk")
def score_chunk(chunk_id: int) -> None:
    delay = settings().debug_chunk_delay_s
    outcome = cycles.score_chunk(
        engine(),
        chunk_id,
        settings(),
        worker=worker_name(),
        before_complete=(lambda: time.sleep(delay)) if delay else None,
    )
    if outcome.select:
        select.delay(outcome.cycle_id)


@task("focalloop.select")
def select(cycle_id: int) -> None:
    if cycles.select_cycle(engine(), cycle_id, settings()):
        hand_off.delay(cycle_id)


@task("focalloop.hand_off")
def hand_off(cycle_id: int) -> None:
    event_ids = cycles.hand_off(engine(), cycle_id, settings())
    if event_ids:
        ingest.delay(event_ids)


@task("focalloop.ingest")
def ingest(event_ids: list[int]) -> None:
    report = cycles.ingest_events(engine(), event_ids)
    log.info("ingested %s", report)


@task("focalloop.snapshot")
def snapshot(project_name: str) -> None:
    with session_scope(engine()) as session:
        commit_snapshot(session, get_project(session, project_name), settings=settings())


@task("focalloop.maybe_start_cycles")
def maybe_start_cycles() -> None:
    """Beat: give every project the chance to start a cycle."""
    for cycle in cycles.start_due_cycles(engine(), settings()):
        train.delay(cycle.id or 0)


@task("focalloop.sync_label_studio")
def sync_label_studio() -> None:
    """Beat: push pending tasks and reconcile answers for every Label Studio project."""
    labelstudio.reconcile_all(engine(), settings())


@task("focalloop.recover_stalled")
def recover_stalled() -> None:
    """Beat: re-enqueue work whose worker died or whose message was lost."""
    recovery = cycles.recover_stalled(engine(), settings())
    for chunk_id in recovery.chunk_ids:
        score_chunk.delay(chunk_id)
    for cycle_id in recovery.train_cycle_ids:
        train.delay(cycle_id)
    for cycle_id in recovery.select_cycle_ids:
        select.delay(cycle_id)
    for cycle_id in recovery.hand_off_cycle_ids:
        hand_off.delay(cycle_id)
    if recovery.event_ids:
        ingest.delay(recovery.event_ids)
    if any(vars(recovery).values()):
        log.info("recovery: %s", recovery)
