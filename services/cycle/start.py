"""Starting and cancelling cycles: a pending cycle on the newest dataset version (one active per
project, enforced by the database), numbered within its project, with its evaluation set topped
up from the project's seed."""

from datetime import timedelta

from sqlmodel import Session, col, func, select

from services.config import Settings
from services.cycle.budget import budget_spent, labels_since_last_cycle, labels_spent
from services.cycle.leases import cancel_if_requested
from services.cycle.seeds import Purpose, derive_seed
from services.errors import InvalidInput, NotFound
from services.evaluation_set import reserve_eval_set
from services.models import (
    FINAL_CYCLE_STATES,
    Cycle,
    CycleState,
    DatasetVersion,
    DatasetVersionState,
    Project,
    utcnow,
)
from services.projects import get_project
from services.state import create_cycle


def start_cycle(session: Session, project_name: str, *, trigger: str, settings: Settings) -> Cycle:
    """A new pending cycle on the project's newest committed dataset version.

    Refused (InvalidInput) for a paused project, and for a spent label budget once a finished
    cycle has trained on a version holding every label (`budget.labels_since_last_cycle`: the
    last labels within the budget are always trained on). Conflict when the project already
    has an active cycle (the database's unique index decides, so concurrent starts yield
    exactly one cycle).
    """
    project = get_project(session, project_name)
    if project.paused:
        raise InvalidInput(f"project {project.name!r} is paused; resume it to start cycles")
    if budget_spent(session, project) and labels_since_last_cycle(session, project) == 0:
        raise InvalidInput(
            f"project {project.name!r} has spent its label budget "
            f"({labels_spent(session, project)} of {project.label_budget}) and a cycle has "
            "already trained on its last labels"
        )
    latest = session.exec(
        select(func.max(DatasetVersion.version)).where(
            DatasetVersion.project_id == project.id,
            DatasetVersion.state == DatasetVersionState.COMMITTED,
        )
    ).one()
    cycle = create_cycle(session, project_id=project.id or 0, trigger=trigger)
    cycle.dataset_version = latest
    cycle.deadline_at = utcnow() + timedelta(seconds=settings.cycle_deadline_s)
    session.add(cycle)
    session.flush()
    # Items added to the pool since the last cycle widen the evaluation set to its share.
    reserve_eval_set(
        session,
        project,
        seed=derive_seed(project.seed, cycle.number, Purpose.EVALUATION_SET),
    )
    return cycle


def cancel_cycle(session: Session, project_name: str) -> Cycle:
    """Ask the project's active cycle to stop. A pending cycle stops at once; a running one at
    its next checkpoint (chunk start, end of training, selection, hand-off)."""
    project = get_project(session, project_name)
    cycle = active_cycle(session, project)
    if cycle is None:
        raise NotFound(f"project {project.name!r} has no active cycle to cancel")
    cycle.cancel_requested = True
    session.add(cycle)
    session.flush()
    if cycle.state == CycleState.PENDING:
        cancel_if_requested(session, cycle)
    session.refresh(cycle)
    return cycle


def active_cycle(session: Session, project: Project) -> Cycle | None:
    return session.exec(
        select(Cycle).where(
            Cycle.project_id == project.id,
            col(Cycle.state).not_in([str(s) for s in FINAL_CYCLE_STATES]),
        )
    ).first()
