"""Beat's trigger: when a project's next cycle starts. Enough new labels since the newest model,
its cron firing, or its first run start one; once the label budget is spent, one last cycle
trains on the final labels and then nothing starts. New labels are committed as a dataset
version (the snapshot) before the cycle that trains on them starts."""

import logging
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from celery.schedules import crontab
from sqlmodel import Session, col, func, select

from services.config import Settings
from services.cycle.budget import budget_spent, labels_after, labels_since_last_cycle
from services.cycle.start import active_cycle, start_cycle
from services.datasets.snapshot import get_version, snapshot
from services.db import session_scope
from services.errors import Conflict
from services.models import Cycle, Item, Project, utcnow
from services.projects import get_project, list_projects
from services.promotion import newest_model

log = logging.getLogger("focalloop.cycle")


def labels_since_model(session: Session, project: Project) -> int:
    """Human labels stored since the dataset version the newest model was trained on was
    committed (all human labels when there is no model yet). The newest, not the current: a
    model the gate rejected was trained on those labels, and retraining on them again would
    loop."""
    model = newest_model(session, project)
    if model is None:
        return labels_after(session, project, None)
    return labels_after(
        session, project, get_version(session, project, model.dataset_version).committed_at
    )


def cron_due(project: Project, last_start: datetime | None, now: datetime) -> bool:
    if not project.retrain_cron or last_start is None:
        return False
    minute, hour, day_of_month, month, day_of_week = project.retrain_cron.split()
    schedule = crontab(
        minute=minute,
        hour=hour,
        day_of_month=day_of_month,
        month_of_year=month,
        day_of_week=day_of_week,
        nowfun=lambda: now,
    )
    return bool(schedule.is_due(last_start).is_due)


@dataclass(frozen=True)
class _Due:
    """Why the next cycle starts, and whether labels arrived that no dataset version holds."""

    trigger: str
    new_labels: bool


def _due(session: Session, project: Project, now: datetime) -> _Due | None:
    """The project's next cycle's trigger, or None when none is due."""
    last_start = session.exec(
        select(func.max(Cycle.created_at)).where(Cycle.project_id == project.id)
    ).one()
    if last_start is None:
        return _Due("first cycle", new_labels=True)
    new_labels = labels_since_model(session, project)
    if budget_spent(session, project):
        # No more labels will come: train on the last ones whatever the retrain threshold.
        final = labels_since_last_cycle(session, project)
        return _Due(f"budget spent: training on the last {final} labels", True) if final else None
    if new_labels >= project.retrain_min_new_labels:
        return _Due(f"{new_labels} new labels", new_labels=True)
    if cron_due(project, last_start, now):
        return _Due(f"cron {project.retrain_cron}", new_labels=new_labels > 0)
    return None


def maybe_start_cycle(
    engine: sa.Engine, project_name: str, settings: Settings, *, now: datetime | None = None
) -> Cycle | None:
    """Beat's trigger for one project: start a cycle when none is active, the project is not
    paused, and a trigger is due (see `_due`). New labels are first committed as a dataset
    version, so the cycle trains on them."""
    now = now or utcnow()
    with session_scope(engine) as session:
        project = get_project(session, project_name)
        if project.paused or active_cycle(session, project) is not None:
            return None
        due = _due(session, project, now)
        if due is None:
            return None
        if due.new_labels:
            labeled = session.exec(
                select(func.count())
                .select_from(Item)
                .where(Item.project_id == project.id, col(Item.label).is_not(None))
            ).one()
            if labeled:
                snapshot(session, project, settings=settings)
        try:
            return start_cycle(session, project.name, trigger=due.trigger, settings=settings)
        except Conflict:
            return None  # a concurrent trigger won; its cycle runs


def start_due_cycles(engine: sa.Engine, settings: Settings) -> list[Cycle]:
    """`maybe_start_cycle` for every project; returns the cycles started (to train).

    One project's failure (a store that cannot be reached, broken settings) is logged and
    skipped: it must not stop the other projects' loops. It is tried again on the next call.
    """
    with session_scope(engine) as session:
        names = [project.name for project in list_projects(session)]
    started = []
    for name in names:
        try:
            cycle = maybe_start_cycle(engine, name, settings)
        except Exception:
            log.exception("project %s: could not start a cycle", name)
            continue
        if cycle is not None:
            log.info("project %s: started cycle %s (%s)", name, cycle.id, cycle.trigger)
            started.append(cycle)
    return started
