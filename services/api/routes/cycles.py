"""Cycles: list, get, start, cancel."""

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, status
from sqlmodel import Session

from services.api.deps import EngineDep, ReadDep, SessionDep, SettingsDep, WriteDep
from services.api.routes.projects import ProjectName
from services.api.schemas import ERRORS, CyclePublic
from services.audit import record
from services.cycle.start import cancel_cycle
from services.db import session_scope
from services.errors import Conflict
from services.models import FINAL_CYCLE_STATES, Cycle
from services.projects import get_project
from services.status import cycle_view, get_cycle, list_cycles
from workers.enqueue import start_and_enqueue

router = APIRouter(prefix="/api/v1/projects/{project}/cycles", tags=["cycles"], responses=ERRORS)
CycleId = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.get("", response_model=list[CyclePublic])
def list_recent(
    project: ProjectName,
    session: SessionDep,
    _: ReadDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
    before_id: Annotated[
        int | None, Query(ge=1, le=2**31 - 1, description="Page: ids below.")
    ] = None,
) -> list[CyclePublic]:
    """Newest first: state, timeline, durations, chunk progress, failure reason."""
    row = get_project(session, project)
    return [
        CyclePublic.of(view) for view in list_cycles(session, row, limit=limit, before_id=before_id)
    ]


@router.get("/{cycle_id}", response_model=CyclePublic)
def get(project: ProjectName, cycle_id: CycleId, session: SessionDep, _: ReadDep) -> CyclePublic:
    return CyclePublic.of(
        cycle_view(session, get_cycle(session, get_project(session, project), cycle_id))
    )


@router.post(
    "",
    response_model=CyclePublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        409: {"description": "the project already has an active cycle"},
        503: {"description": "the broker cannot take the training message; nothing started"},
    },
)
def start(
    request: Request, project: ProjectName, engine: EngineDep, settings: SettingsDep, who: WriteDep
) -> CyclePublic:
    """Start a cycle now on the newest dataset version and enqueue its training. Refused for a
    paused project or a spent budget (422), while another cycle is active (409), and when the
    broker cannot take the training message (503: nothing is left pending)."""

    def audit(session: Session, cycle: Cycle) -> None:
        record(
            session,
            actor=who.actor,
            action="cycle.start",
            project_id=cycle.project_id,
            target=f"cycle:{cycle.id}",
        )

    cycle = start_and_enqueue(
        engine,
        settings,
        request.app.state.celery,
        project,
        trigger=f"api ({who.actor})",
        also=audit,
    )
    with session_scope(engine) as session:
        return CyclePublic.of(
            cycle_view(session, get_cycle(session, get_project(session, project), cycle.id or 0))
        )


@router.post(
    "/{cycle_id}/cancel",
    response_model=CyclePublic,
    responses={409: {"description": "the cycle already ended"}},
)
def cancel(
    project: ProjectName, cycle_id: CycleId, session: SessionDep, who: WriteDep
) -> CyclePublic:
    """Cancel a running cycle: a pending one stops at once, a running one at its next
    checkpoint (chunk start, end of training, selection, hand-off)."""
    row = get_project(session, project)
    cycle = get_cycle(session, row, cycle_id)
    if cycle.state in FINAL_CYCLE_STATES:
        raise Conflict(f"cycle {cycle_id} already ended ({cycle.state})")
    cancelled = cancel_cycle(session, project)
    record(
        session,
        actor=who.actor,
        action="cycle.cancel",
        project_id=row.id,
        target=f"cycle:{cycle_id}",
    )
    return CyclePublic.of(cycle_view(session, cancelled))
