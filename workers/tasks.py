"""Thin task adapters: ids in -> one step of the flow (`services.cycle.stages.run_step`) ->
enqueue the steps it returned, each as its stage's task.

Every task is safe to run twice: the services functions claim work with conditional UPDATEs and
fence completions with attempt numbers, so a redelivered message finds nothing to do. Retries
are Celery's (`autoretry_for=TransientError`); failures that retrying cannot fix are recorded on
the cycle by the services layer with their reason.
"""

import logging
from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, cast

import sqlalchemy as sa
from billiard.process import current_process
from celery.signals import task_postrun, task_prerun, worker_process_init, worker_ready

from labeling.registry import reconcile_all
from services import logs
from services.config import Settings, get_settings
from services.cycle.flow import Stage, Step, task_name
from services.cycle.recover import recover_stalled as find_stalled
from services.cycle.stages import run_step
from services.cycle.trigger import start_due_cycles
from services.db import engine_from_settings
from services.errors import TransientError
from services.tuning import TRIAL_TASK
from workers.app import RECONCILE, RECOVER, START_DUE, app
from workers.devices import WorkerPlan, pin
from workers.enqueue import broker_was_reset
from workers.heartbeat import forget_inherited_engine

log = logging.getLogger("focalloop.workers")
_ENGINE: sa.Engine | None = None
_PLAN = WorkerPlan(concurrency=1)


def use_plan(plan: WorkerPlan, *, forks: bool) -> None:
    """The pool's device plan, set by `focalloop worker` before the pool starts. Forked pool
    processes pin themselves when they start; a pool that does not fork (solo, threads) pins
    this process now, before anything has asked for CUDA."""
    global _PLAN
    _PLAN = plan
    if not forks:
        pin(plan, 0)


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
    # A forked pool child must not reuse the parent's connections. CUDA is untouched in the
    # parent; the child pins its GPU (by its pool index, which a replacement process inherits)
    # before torch first asks for a device.
    global _ENGINE
    index = int(getattr(current_process(), "index", 0))
    pin(_PLAN, index)
    if _PLAN.gpus:
        log.info("pool process %d pinned to GPU %s", index, _PLAN.gpu_of(index))
    if _ENGINE is not None:
        _ENGINE.dispose(close=False)
    _ENGINE = None
    forget_inherited_engine()
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


def _send(steps: list[Step]) -> None:
    """Enqueue each following step as its stage's task."""
    for step in steps:
        TASKS[step.stage].delay(*step.args)


def _run(step: Step) -> None:
    _send(run_step(engine(), settings(), step))


@task(task_name(Stage.TRAIN))
def train(cycle_id: int) -> None:
    _run(Step(Stage.TRAIN, cycle_id))


@task(task_name(Stage.SCORE))
def score_chunk(chunk_id: int) -> None:
    _run(Step(Stage.SCORE, chunk_id))


@task(task_name(Stage.SELECT))
def select(cycle_id: int) -> None:
    _run(Step(Stage.SELECT, cycle_id))


@task(task_name(Stage.HAND_OFF))
def hand_off(cycle_id: int) -> None:
    _run(Step(Stage.HAND_OFF, cycle_id))


@task(task_name(Stage.INGEST))
def ingest(event_ids: list[int]) -> None:
    _run(Step(Stage.INGEST, event_ids=tuple(event_ids)))


TASKS: dict[Stage, TaskHandle[...]] = {
    Stage.TRAIN: train,
    Stage.SCORE: score_chunk,
    Stage.SELECT: select,
    Stage.HAND_OFF: hand_off,
    Stage.INGEST: ingest,
}


@task(START_DUE)
def maybe_start_cycles() -> None:
    """Beat: give every project the chance to start a cycle."""
    _send([Step(Stage.TRAIN, cycle.id or 0) for cycle in start_due_cycles(engine(), settings())])


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_due_now(**_: Any) -> None:
    # Beat's first tick comes one interval after it starts (a new schedule entry counts as just
    # run): without this, a new deployment's first cycle, and its annotators' first tasks, wait
    # that long. Several workers each asking is harmless: one cycle per project can start.
    if not settings().start_due_cycles_at_once:
        return
    try:
        maybe_start_cycles.delay()
    except Exception:
        log.warning("could not ask for due cycles at start; beat will", exc_info=True)


@task(RECONCILE)
def reconcile_labelers() -> None:
    """Beat: every project's labeler catches up with its tool (Label Studio: push pending
    tasks, take in what webhooks missed)."""
    reconcile_all(engine(), settings())


@task(RECOVER)
def recover_stalled() -> None:
    """Beat: re-enqueue work whose worker died or whose message was lost. When the broker lost
    its data (a Redis restart without it), every message may be gone: all unfinished work is
    re-enqueued at once instead of after a lease (claims make the duplicates harmless)."""
    reset = broker_was_reset(settings())
    if reset:
        log.warning("the broker holds none of its earlier data: re-enqueueing all open work")
    recovery = find_stalled(engine(), settings(), stale_s=0.0 if reset else None)
    _send(recovery.steps())
    if any(vars(recovery).values()):
        log.info("recovery: %s", recovery)


@task(TRIAL_TASK)
def tune_trial(request: dict[str, Any]) -> None:
    """`focalloop tune`: run one grid cell or search trial of a study (services.tuning.run)."""
    from services.tuning.run import TrialRequest, run_request

    run_request(engine(), settings(), TrialRequest(**request))
