"""A project right now, as the console and the terminal (`up`, `cycle status --watch`) show it:
the glance (loop state, cycle and stage, labels against the budget, models, alerts), the live
cycle (stage, epoch of N with loss, chunks scored of M, ETA), label issues, dataset versions.

Read-only, and bounded: every list has a limit, every count goes through an index, so the pages
stay fast on a pool of a million items (`focalloop bench console`).
"""

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from services.alerts import Firing, firing
from services.cycle.budget import labels_spent
from services.models import (
    FINAL_CYCLE_STATES,
    Cycle,
    CycleState,
    DatasetVersion,
    DatasetVersionState,
    Item,
    ItemStatus,
    LabelTask,
    LabelTaskState,
    Project,
    utcnow,
)
from services.promotion import current_model, newest_model
from services.status import headline_report

LIST_LIMIT = 50


@dataclass(frozen=True)
class LiveCycle:
    """The project's newest cycle as it runs.

    epoch/epochs: training's newest finished epoch of at most `epochs` (early stopping may end
    it sooner, so the training ETA is an upper bound); losses in nats. eta_s: seconds left in
    the current stage, None where there is nothing to extrapolate from.
    """

    id: int
    number: int
    state: str
    active: bool
    trigger: str
    stage: str
    epoch: int | None
    epochs: int | None
    train_loss: float | None
    val_loss: float | None
    chunks_done: int
    chunks_total: int | None
    eta_s: float | None
    selected: int | None
    failure_reason: str | None
    note: str | None
    updated_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _state_entered(cycle: Cycle, state: str) -> datetime | None:
    for entry in reversed(cycle.timeline or []):
        if entry["state"] == state:
            return datetime.fromisoformat(entry["at"])
    return None


def live_cycle(cycle: Cycle, *, now: datetime | None = None) -> LiveCycle:
    moment = now or utcnow()
    progress = dict(cycle.progress or {}) if cycle.state == CycleState.TRAINING else {}
    epoch, epochs = progress.get("epoch"), progress.get("epochs")
    eta: float | None = None
    if epoch and epochs:
        spent = (
            datetime.fromisoformat(progress["at"]) - datetime.fromisoformat(progress["started_at"])
        ).total_seconds()
        eta = spent / epoch * (epochs - epoch)
    scoring_since = _state_entered(cycle, CycleState.SCORING)
    scoring = cycle.state == CycleState.SCORING and cycle.chunks_total and cycle.chunks_done
    if scoring and scoring_since is not None and cycle.chunks_total:
        spent = (moment - scoring_since).total_seconds()
        eta = spent / cycle.chunks_done * (cycle.chunks_total - cycle.chunks_done)
    return LiveCycle(
        id=cycle.id or 0,
        number=cycle.number,
        state=cycle.state,
        active=cycle.state not in FINAL_CYCLE_STATES,
        trigger=cycle.trigger,
        stage=_stage_text(cycle, epoch, epochs, progress.get("train_loss")),
        epoch=epoch,
        epochs=epochs,
        train_loss=progress.get("train_loss"),
        val_loss=progress.get("val_loss"),
        chunks_done=cycle.chunks_done,
        chunks_total=cycle.chunks_total,
        eta_s=eta,
        selected=cycle.selected_count,
        failure_reason=cycle.failure_reason,
        note=cycle.note,
        updated_at=cycle.updated_at.isoformat(),
    )


def _stage_text(cycle: Cycle, epoch: int | None, epochs: int | None, loss: float | None) -> str:
    if cycle.state == CycleState.TRAINING:
        if epoch is None:
            return "training: starting"
        shown = f", loss {loss:.4f}" if loss is not None else ""
        return f"training: epoch {epoch} of at most {epochs}{shown}"
    if cycle.state == CycleState.SCORING:
        return f"scoring: {cycle.chunks_done} of {cycle.chunks_total or '?'} chunks"
    if cycle.state == CycleState.DONE:
        return f"done: {cycle.selected_count or 0} items handed off"
    if cycle.state == CycleState.FAILED:
        return f"failed: {cycle.failure_reason or 'no reason recorded'}"
    return cycle.state.replace("_", " ")


def newest_cycle(session: Session, project: Project) -> Cycle | None:
    return session.exec(
        select(Cycle)
        .where(Cycle.project_id == project.id)
        .order_by(col(Cycle.number).desc())
        .limit(1)  # first() alone would load (and decode) every cycle of the project
    ).first()


def open_task_count(session: Session, project: Project) -> int:
    return int(
        session.exec(
            select(func.count())
            .select_from(LabelTask)
            .where(
                LabelTask.project_id == project.id,
                col(LabelTask.state) != LabelTaskState.ANSWERED,
            )
        ).one()
    )


def status_line(g: "Glance") -> str:
    """One line for a terminal: stage and progress, the current model's macro-F1, open tasks."""
    cycle = f"cycle #{g.cycle.number} {g.cycle.stage}" if g.cycle is not None else "no cycle yet"
    eta = (
        f" (ETA {g.cycle.eta_s:.0f} s)"
        if g.cycle is not None and g.cycle.active and g.cycle.eta_s is not None
        else ""
    )
    model = (
        f"m{g.current_model} macro-F1 {g.current_macro_f1:.3f}"
        if g.current_model is not None and g.current_macro_f1 is not None
        else f"m{g.current_model}"
        if g.current_model is not None
        else "no model yet"
    )
    paused = " [paused]" if g.paused else ""
    alerts = f" · {len(g.alerts)} alert(s)" if g.alerts else ""
    return f"{g.name}{paused} · {cycle}{eta} · {model} · {g.open_tasks} open tasks{alerts}"


@dataclass(frozen=True)
class Glance:
    """A project on the projects list: the loop's state, labels against the budget, the
    current model and what the gate said about the newest one, the alerts that hold now."""

    name: str
    paused: bool
    cycle: LiveCycle | None
    labels_used: int
    label_budget: int | None
    open_tasks: int
    current_model: int | None
    current_macro_f1: float | None
    newest_model: int | None
    gate_decision: str | None
    gate_reason: str | None
    alerts: list[Firing]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def glance(session: Session, project: Project) -> Glance:
    """The project at a glance (a handful of indexed queries)."""
    cycle = newest_cycle(session, project)
    current = current_model(session, project)
    newest = newest_model(session, project)
    _, report = headline_report(current.metrics) if current is not None else (None, None)
    return Glance(
        name=project.name,
        paused=project.paused,
        cycle=live_cycle(cycle) if cycle is not None else None,
        labels_used=labels_spent(session, project),
        label_budget=project.label_budget,
        open_tasks=open_task_count(session, project),
        current_model=current.version if current is not None else None,
        current_macro_f1=float(report["macro_f1"]) if report is not None else None,
        newest_model=newest.version if newest is not None else None,
        gate_decision=newest.promotion if newest is not None else None,
        gate_reason=newest.promotion_reason if newest is not None else None,
        alerts=firing(session, project),
    )


@dataclass(frozen=True)
class LabelIssues:
    """Items whose data could not be read (by name, with the reason) and answers the labeling
    tool sent that were refused (the item, and why), newest first, at most LIST_LIMIT each."""

    unreadable_total: int
    unreadable: list[tuple[str, str]]
    refused_total: int
    refused: list[tuple[str, str]]


def label_issues(session: Session, project: Project) -> LabelIssues:
    unreadable = select(Item.external_id, Item.status_reason).where(
        Item.project_id == project.id, Item.status == ItemStatus.UNREADABLE
    )
    refused = select(Item.external_id, Item.label_issue).where(
        Item.project_id == project.id, col(Item.label_issue).is_not(None)
    )
    return LabelIssues(
        unreadable_total=_count(session, unreadable),
        unreadable=[
            (name, reason or "no reason recorded")
            for name, reason in session.exec(
                unreadable.order_by(col(Item.id).desc()).limit(LIST_LIMIT)
            )
        ],
        refused_total=_count(session, refused),
        refused=[
            (name, issue or "")
            for name, issue in session.exec(
                refused.order_by(col(Item.updated_at).desc()).limit(LIST_LIMIT)
            )
        ],
    )


def _count(session: Session, statement: Any) -> int:
    return int(session.exec(select(func.count()).select_from(statement.subquery())).one())


@dataclass(frozen=True)
class VersionRow:
    """A committed dataset version and how its class counts changed from its parent's."""

    version: int
    parent: int | None
    rows: int
    change: dict[str, int]
    committed_at: datetime | None


def dataset_versions(session: Session, project: Project) -> list[VersionRow]:
    versions = list(
        session.exec(
            select(DatasetVersion)
            .where(
                DatasetVersion.project_id == project.id,
                DatasetVersion.state == DatasetVersionState.COMMITTED,
            )
            .order_by(col(DatasetVersion.version).desc())
            .limit(LIST_LIMIT + 1)
        )
    )
    counts = {v.version: dict(v.class_counts or {}) for v in versions}
    rows = []
    for v in versions[:LIST_LIMIT]:
        mine = counts[v.version]
        parent = counts.get(v.parent_version, {}) if v.parent_version is not None else {}
        change = {
            label: mine.get(label, 0) - parent.get(label, 0)
            for label in project.labels
            if mine.get(label, 0) != parent.get(label, 0)
        }
        rows.append(
            VersionRow(v.version, v.parent_version, v.row_count or 0, change, v.committed_at)
        )
    return rows


def evaluation_items(session: Session, project: Project) -> dict[str, int]:
    """The evaluation set's items by status (labeled, queued, ...)."""
    return {
        str(status): int(n)
        for status, n in session.exec(
            select(Item.status, func.count())
            # "= true", not "IS true": only the former matches the partial index on eval_set.
            .where(Item.project_id == project.id, col(Item.eval_set) == sa.true())
            .group_by(Item.status)
        )
    }
