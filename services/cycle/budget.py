"""The label budget as the database knows it: labels people gave (evaluation answers
included; labels that came with the pool are not spent by the loop) and items already asked
for. The arithmetic is `decide.allowance`."""

from datetime import datetime

from sqlmodel import Session, col, func, select

from services.cycle.decide import allowance
from services.datasets.pool import SEED_SOURCE
from services.datasets.snapshot import get_version
from services.models import Annotation, Cycle, CycleState, Item, ItemStatus, Project


def labels_spent(session: Session, project: Project) -> int:
    """Items people labeled (a live, not cancelled answer from any source but the pool's seeds):
    what the label budget counts."""
    return int(
        session.exec(
            select(func.count(func.distinct(Annotation.item_id))).where(
                Annotation.project_id == project.id,
                Annotation.source != SEED_SOURCE,
                col(Annotation.cancelled).is_(False),
                col(Annotation.withdrawn_at).is_(None),
            )
        ).one()
    )


def items_committed(session: Session, project: Project) -> int:
    """Items asked for and not answered yet (selected or queued): they will be labeled."""
    return int(
        session.exec(
            select(func.count())
            .select_from(Item)
            .where(
                Item.project_id == project.id,
                col(Item.status).in_([ItemStatus.SELECTED, ItemStatus.QUEUED]),
            )
        ).one()
    )


def budget_spent(session: Session, project: Project) -> bool:
    return project.label_budget is not None and (
        labels_spent(session, project) >= project.label_budget
    )


def allowance_now(session: Session, project: Project) -> int:
    """Items this project's next selection may ask for."""
    if project.label_budget is None:
        return project.batch_size
    return allowance(
        batch_size=project.batch_size,
        budget=project.label_budget,
        spent=labels_spent(session, project),
        committed=items_committed(session, project),
    )


def labels_after(session: Session, project: Project, moment: datetime | None) -> int:
    """Answers people gave after `moment` (all of them for None): labels, not skips."""
    statement = (
        select(func.count())
        .select_from(Annotation)
        .where(
            Annotation.project_id == project.id,
            Annotation.source != SEED_SOURCE,
            col(Annotation.cancelled).is_(False),
        )
    )
    if moment is not None:
        statement = statement.where(col(Annotation.created_at) > moment)
    return int(session.exec(statement).one())


def labels_since_last_cycle(session: Session, project: Project) -> int:
    """Labels people gave after the dataset version the project's newest finished cycle trained
    on was committed (all of them when none finished, or it had no version): once the budget is
    spent, a cycle still starts while this is above zero, so the last labels are trained on,
    also after a last cycle that failed, was cancelled, or was started on an older version."""
    newest = session.exec(
        select(Cycle)
        .where(Cycle.project_id == project.id, Cycle.state == CycleState.DONE)
        .order_by(col(Cycle.number).desc())
    ).first()
    if newest is None or newest.dataset_version is None:
        return labels_after(session, project, None)
    version = get_version(session, project, newest.dataset_version)
    return labels_after(session, project, version.committed_at)
