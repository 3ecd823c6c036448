"""The trigger: when a project's next cycle starts. Its first run, enough new labels since the
newest model, the labeling queue running low (fewer open tasks than `refill_below`, with at least
one new label to learn from), or its cron start one; once the label budget is spent, one last
cycle trains on the final labels and then nothing starts. Beat asks on its interval, and the
ingest stage asks at once after answers arrive, so an annotator is not left waiting a tick. New
labels are committed as a dataset version (the snapshot) before the cycle that trains on them
starts."""

import logging
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from labeling.registry import answers_later
from services.config import Settings
from services.cron import retrain_crontab
from services.cycle.budget import budget_spent, labels_after, labels_since_last_cycle
from services.cycle.start import active_cycle, start_cycle
from services.datasets.snapshot import committed_versions, get_version, snapshot
from services.db import lock_for_write, session_scope
from services.errors import Conflict, InvalidInput, NotFound
from services.models import Annotation, Cycle, Item, ItemStatus, Project, utcnow
from services.projects import list_projects
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


def open_tasks(session: Session, project: Project) -> int:
    """Items handed to the labeler and not answered yet: waiting for a label (queued) or for
    a review of their label (in review)."""
    return int(
        session.exec(
            select(func.count())
            .select_from(Item)
            .where(
                Item.project_id == project.id,
                col(Item.status).in_([ItemStatus.QUEUED, ItemStatus.IN_REVIEW]),
            )
        ).one()
    )


def queue_low(session: Session, project: Project) -> int | None:
    """The open task count when the project's labeling queue needs refilling, else None. Only
    a labeler whose people answer later has a queue; 0 turns the refill off; a pool with no
    unlabeled item left has nothing to refill it with."""
    if not project.refill_below or not answers_later(project):
        return None
    waiting = open_tasks(session, project)
    if waiting >= project.refill_below:
        return None
    left = session.exec(
        select(Item.id)
        .where(Item.project_id == project.id, Item.status == ItemStatus.UNLABELED)
        .limit(1)
    ).first()
    return waiting if left is not None else None


def cron_due(project: Project, last_start: datetime | None, now: datetime) -> bool:
    if not project.retrain_cron or last_start is None:
        return False
    try:
        schedule = retrain_crontab(project.retrain_cron, now=lambda: now)
    except InvalidInput as error:
        # Saved by a version that checked less: the project runs on its label threshold alone.
        log.warning("project %s: retrain cron ignored: %s", project.name, error)
        return False
    return bool(schedule.is_due(last_start).is_due)


def _due(session: Session, project: Project, now: datetime) -> str | None:
    """The trigger of the project's next cycle, or None when none is due."""
    last_start = session.exec(
        select(func.max(Cycle.created_at)).where(Cycle.project_id == project.id)
    ).one()
    if last_start is None:
        return "first cycle"
    if budget_spent(session, project):
        # No more labels will come: train on the last ones whatever the retrain threshold.
        final = labels_since_last_cycle(session, project)
        return f"budget spent: training on the last {final} labels" if final else None
    new_labels = labels_since_model(session, project)
    if new_labels >= project.retrain_min_new_labels:
        return f"{new_labels} new labels"
    # A refill needs something new to learn from: without it, the same model would select the
    # same items again (an exhausted pool would start a cycle at every tick).
    waiting = queue_low(session, project) if new_labels else None
    if waiting is not None:
        return f"queue low: {waiting} open tasks (refill below {project.refill_below})"
    if cron_due(project, last_start, now):
        return f"cron {project.retrain_cron}"
    return None


def _unversioned_changes(session: Session, project: Project) -> bool:
    """Whether labels changed since the newest committed dataset version (an answer given or
    withdrawn after it, or labels and no version yet): only then is a new version committed."""
    versions = committed_versions(session, project)
    committed = versions[-1].committed_at if versions else None
    if committed is None:
        return (
            session.exec(
                select(func.count())
                .select_from(Item)
                .where(Item.project_id == project.id, col(Item.label).is_not(None))
            ).one()
            > 0
        )
    changed = session.exec(
        select(func.count())
        .select_from(Annotation)
        .where(
            Annotation.project_id == project.id,
            sa.or_(
                col(Annotation.created_at) > committed,
                col(Annotation.withdrawn_at) > committed,
            ),
        )
    ).one()
    return changed > 0


def maybe_start_cycle(
    engine: sa.Engine, project_name: str, settings: Settings, *, now: datetime | None = None
) -> Cycle | None:
    """Beat's trigger for one project: start a cycle when none is active, the project is not
    paused, and a trigger is due (see `_due`). Labels that changed since the newest dataset
    version are first committed as a new one, so the cycle trains on them."""
    now = now or utcnow()
    with session_scope(engine) as session:
        # Under a lock on the project's row: ingest tasks running side by side ask at once, and
        # only one may commit the new labels as a version and start the cycle. FOR NO KEY
        # UPDATE on PostgreSQL, so answers being stored (their foreign key share-locks the row)
        # do not wait for the snapshot; SQLite's write lock otherwise.
        lock_for_write(session)
        project = session.exec(
            select(Project)
            .where(Project.name == project_name)
            .with_for_update(key_share=True)
            .execution_options(populate_existing=True)
        ).first()
        if project is None:
            raise NotFound(f"no project named {project_name!r}")
        if project.paused or active_cycle(session, project) is not None:
            return None
        trigger = _due(session, project, now)
        if trigger is None:
            return None
        if _unversioned_changes(session, project):
            snapshot(session, project, settings=settings)
        try:
            return start_cycle(session, project.name, trigger=trigger, settings=settings)
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
