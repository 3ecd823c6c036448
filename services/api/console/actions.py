"""What a write token may do from the console: one function per action, registered by the name
its form posts to. Each calls the same service function as its REST route and records the same
audit action, so the audit log reads alike whichever door was used.
"""

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from celery import Celery
from sqlmodel import Session

from services.audit import record
from services.auth import Principal
from services.config import Settings
from services.cycle.start import cancel_cycle
from services.db import session_scope
from services.errors import Conflict, InvalidInput
from services.models import FINAL_CYCLE_STATES, Cycle
from services.projects import get_project, set_paused
from services.promotion import make_current
from services.status import get_cycle
from workers.enqueue import start_and_enqueue


@dataclass(frozen=True)
class ActionRequest:
    """An action on `project` by `principal`; `target` is the cycle id or model version the
    form names (None for project-wide actions)."""

    engine: sa.Engine
    settings: Settings
    celery: Celery
    principal: Principal
    project: str
    target: int | None


def _target(request: ActionRequest, what: str) -> int:
    if request.target is None:
        raise InvalidInput(f"this action needs the {what}")
    return request.target


def start(request: ActionRequest) -> str:
    def audit(session: Session, cycle: Cycle) -> None:
        record(
            session,
            actor=request.principal.actor,
            action="cycle.start",
            project_id=cycle.project_id,
            target=f"cycle:{cycle.id}",
        )

    cycle = start_and_enqueue(
        request.engine,
        request.settings,
        request.celery,
        request.project,
        trigger=f"console ({request.principal.actor})",
        also=audit,
    )
    return f"cycle {cycle.number} started"


def cancel(request: ActionRequest) -> str:
    cycle_id = _target(request, "cycle")
    with session_scope(request.engine) as session:
        project = get_project(session, request.project)
        cycle = get_cycle(session, project, cycle_id)
        if cycle.state in FINAL_CYCLE_STATES:
            raise Conflict(f"cycle {cycle.number} already ended ({cycle.state})")
        cancelled = cancel_cycle(session, request.project)
        record(
            session,
            actor=request.principal.actor,
            action="cycle.cancel",
            project_id=project.id,
            target=f"cycle:{cycle_id}",
        )
        return f"cycle {cancelled.number}: cancel requested"


def _pause(request: ActionRequest, paused: bool) -> str:
    with session_scope(request.engine) as session:
        project = set_paused(session, request.project, paused=paused)
        record(
            session,
            actor=request.principal.actor,
            action="project.pause" if paused else "project.resume",
            project_id=project.id,
            target=project.name,
        )
    return "paused: beat starts no new cycles" if paused else "resumed"


def _make_current(request: ActionRequest, action: str) -> str:
    version = _target(request, "model version")
    with session_scope(request.engine) as session:
        make_current(
            session, request.project, version, actor=request.principal.actor, action=action
        )
    return f"m{version} is current"


# form name -> (what it does, asked for confirmation first, the action)
ACTIONS: dict[str, tuple[str, bool, Callable[[ActionRequest], str]]] = {
    "start-cycle": ("Start a cycle", False, start),
    "cancel-cycle": ("Cancel the running cycle", True, cancel),
    "pause": ("Pause", False, lambda request: _pause(request, True)),
    "resume": ("Resume", False, lambda request: _pause(request, False)),
    "promote": ("Promote this model", True, lambda r: _make_current(r, "model.promote")),
    "rollback": ("Roll back to this model", True, lambda r: _make_current(r, "model.rollback")),
}
