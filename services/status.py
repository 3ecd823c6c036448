"""Read models for the status API and the metrics: cycles with their durations, models with
their metrics, the labeling queue, annotator throughput and agreement, an item's history.

Everything here only reads; the API renders these dataclasses as its `*Public` schemas.
"""

import itertools
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from services.errors import NotFound
from services.models import (
    Annotation,
    Cycle,
    CycleState,
    DatasetVersion,
    DatasetVersionState,
    InboxEvent,
    Item,
    ItemStatus,
    LabelTask,
    LabelTaskState,
    ModelVersion,
    Project,
    ScoreChunk,
    utcnow,
)

HUMAN_SOURCES = ("cli", "label_studio", "review", "simulated")


@dataclass(frozen=True)
class CycleView:
    """A cycle with its state timeline and derived durations.

    durations_s: seconds spent in each state that was left (state -> s).
    scoring_items_per_s: items scored / seconds in the scoring state (None until it ends).
    """

    cycle: Cycle
    durations_s: dict[str, float]
    duration_s: float | None
    items_scored: int
    scoring_items_per_s: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: what `focalloop cycle status --json` prints (the API renders the same
        view as its CyclePublic)."""
        cycle = self.cycle
        return {
            "id": cycle.id,
            "number": cycle.number,
            "state": cycle.state,
            "trigger": cycle.trigger,
            "dataset_version": cycle.dataset_version,
            "model_version": cycle.model_version,
            "chunks": f"{cycle.chunks_done}/{cycle.chunks_total}"
            if cycle.chunks_total is not None
            else None,
            "progress": cycle.progress if cycle.state == CycleState.TRAINING else None,
            "items_scored": self.items_scored,
            "selected": cycle.selected_count,
            "cold_start_picks": cycle.cold_start_picks,
            "failure_reason": cycle.failure_reason,
            "last_error": cycle.last_error,
            "last_error_at": cycle.last_error_at.isoformat() if cycle.last_error_at else None,
            "train_attempts": cycle.train_attempts,
            "note": cycle.note,
            "cancel_requested": cycle.cancel_requested,
            "timeline": list(cycle.timeline),
            "durations_s": self.durations_s,
            "duration_s": self.duration_s,
        }


def _parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment)


def cycle_view(session: Session, cycle: Cycle) -> CycleView:
    timeline = cycle.timeline or []
    durations: dict[str, float] = {}
    for entry, following in itertools.pairwise(timeline):
        spent = (_parse(following["at"]) - _parse(entry["at"])).total_seconds()
        durations[entry["state"]] = durations.get(entry["state"], 0.0) + spent
    total = (
        (cycle.finished_at - cycle.created_at).total_seconds()
        if cycle.finished_at is not None
        else None
    )
    scored = int(
        session.execute(
            sa.select(func.coalesce(func.sum(col(ScoreChunk.items_scored)), 0)).where(
                col(ScoreChunk.cycle_id) == cycle.id
            )
        ).scalar_one()
    )
    scoring_s = durations.get("scoring")
    rate = scored / scoring_s if scoring_s and scored else None
    return CycleView(cycle, durations, total, scored, rate)


def list_cycles(
    session: Session, project: Project, *, limit: int, before_id: int | None = None
) -> list[CycleView]:
    statement = (
        select(Cycle)
        .where(Cycle.project_id == project.id)
        .order_by(col(Cycle.id).desc())
        .limit(limit)
    )
    if before_id is not None:
        statement = statement.where(col(Cycle.id) < before_id)
    return [cycle_view(session, cycle) for cycle in session.exec(statement).all()]


def get_cycle(session: Session, project: Project, cycle_id: int) -> Cycle:
    cycle = session.get(Cycle, cycle_id)
    if cycle is None or cycle.project_id != project.id:
        raise NotFound(f"project {project.name!r} has no cycle {cycle_id}")
    return cycle


def list_models(session: Session, project: Project) -> list[ModelVersion]:
    return list(
        session.exec(
            select(ModelVersion)
            .where(ModelVersion.project_id == project.id)
            .order_by(col(ModelVersion.version).desc())
        ).all()
    )


def get_model(session: Session, project: Project, version: int) -> ModelVersion:
    model = session.exec(
        select(ModelVersion).where(
            ModelVersion.project_id == project.id, ModelVersion.version == version
        )
    ).first()
    if model is None:
        raise NotFound(f"project {project.name!r} has no model version {version}")
    return model


def headline_report(metrics: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """The report a model is judged by: its evaluation-set report when it has one, else its
    validation split's. Returns (which, report)."""
    if metrics.get("evaluation"):
        return "evaluation set", metrics["evaluation"]
    if metrics.get("validation"):
        return "validation split", metrics["validation"]
    return None, None


def supported_recalls(metrics: dict[str, Any], labels: list[str]) -> dict[str, float]:
    """A model's recall per class name, from its headline report, for the classes that report
    had items of: a class without evaluation support has no recall (not a recall of 0)."""
    _, report = headline_report(metrics)
    if report is None:
        return {}
    names = list(metrics.get("labels") or labels)
    return {
        names[row["label"]]: float(row["recall"]) for row in report["per_class"] if row["support"]
    }


def is_imbalanced(class_counts: dict[str, int] | None) -> bool:
    """Whether a labeled set has a minority worth naming: its rarest class has under half the
    labels of its most common one. Balanced projects get no "minority" figures."""
    counts = [int(n) for n in (class_counts or {}).values()]
    return len(counts) >= 2 and min(counts) * 2 < max(counts)


def committed_versions(session: Session, project: Project) -> list[DatasetVersion]:
    return list(
        session.exec(
            select(DatasetVersion)
            .where(
                DatasetVersion.project_id == project.id,
                DatasetVersion.state == DatasetVersionState.COMMITTED,
            )
            .order_by(col(DatasetVersion.version).desc())
        ).all()
    )


@dataclass(frozen=True)
class AnnotatorStats:
    """One annotator's answers (cancelled ones excluded) over three windows."""

    annotator: str
    last_24h: int
    last_7d: int
    total: int


@dataclass(frozen=True)
class Agreement:
    """Items answered by more than one annotator, and how many of those agree.

    rate: agreeing / multi_annotated (None without any). per_class: by the item's current
    label, {label: [multi_annotated, agreeing]}.
    """

    multi_annotated: int
    agreeing: int
    rate: float | None
    per_class: dict[str, list[int]]


@dataclass(frozen=True)
class QueuedTask:
    external_id: str
    task_id: int | None
    kind: str
    prediction_label: str | None
    prediction_score: float | None


@dataclass(frozen=True)
class RejectedEvent:
    """An event from the labeling tool that ingest set aside, with why (never retried)."""

    event_id: int
    received_at: datetime
    error: str


@dataclass(frozen=True)
class QueueStatus:
    """The labeling queue of a project right now. rejected_events counts every event set aside;
    recent_rejections lists the newest of them."""

    selected: int
    queued: int
    open_label_tasks: int
    reviews_pending: int
    labels_since_last_version: int
    last_version: int | None
    annotators: list[AnnotatorStats]
    agreement: Agreement
    hardest: list[QueuedTask] = field(default_factory=list)
    rejected_events: int = 0
    recent_rejections: list[RejectedEvent] = field(default_factory=list)


def rejected_events(session: Session, project: Project, *, newest: int) -> list[RejectedEvent]:
    """The project's `newest` set-aside events, newest first."""
    rows = session.exec(
        select(InboxEvent.id, InboxEvent.received_at, InboxEvent.error)
        .where(InboxEvent.project_id == project.id, col(InboxEvent.error).is_not(None))
        .order_by(col(InboxEvent.id).desc())
        .limit(newest)
    ).all()
    return [RejectedEvent(int(i or 0), at, str(error)) for i, at, error in rows]


def queue_status(session: Session, project: Project, *, hardest: int = 20) -> QueueStatus:
    counts = dict(
        session.execute(
            sa.select(col(Item.status), func.count())
            .where(
                col(Item.project_id) == project.id,
                col(Item.status).in_([ItemStatus.SELECTED, ItemStatus.QUEUED]),
            )
            .group_by(col(Item.status))
        ).all()
    )
    tasks = dict(
        session.execute(
            sa.select(col(LabelTask.kind), func.count())
            .where(
                col(LabelTask.project_id) == project.id,
                col(LabelTask.state) != LabelTaskState.ANSWERED,
            )
            .group_by(col(LabelTask.kind))
        ).all()
    )

    # The item's id and status as correlated lookups, not a join: joined, PostgreSQL merged
    # the open tasks with the whole item table in id order (0.4 s on a million items).
    def of_item(column: Any) -> Any:
        return sa.select(column).where(col(Item.id) == col(LabelTask.item_id)).scalar_subquery()

    open_rows = session.execute(
        sa.select(
            of_item(col(Item.external_id)),
            col(LabelTask.external_task_id),
            col(LabelTask.kind),
            col(LabelTask.prediction_label),
            col(LabelTask.prediction_score),
        )
        .where(
            col(LabelTask.project_id) == project.id,
            col(LabelTask.state) == LabelTaskState.OPEN,
            of_item(col(Item.status)).in_([ItemStatus.QUEUED, ItemStatus.IN_REVIEW]),
        )
        .order_by(col(LabelTask.prediction_score).asc().nulls_first(), col(LabelTask.id))
        .limit(hardest)
    ).all()
    versions = committed_versions(session, project)
    last = versions[0] if versions else None
    since = (
        select(func.count())
        .select_from(Annotation)
        .where(
            Annotation.project_id == project.id,
            col(Annotation.source).in_(HUMAN_SOURCES),
            col(Annotation.cancelled).is_(False),
        )
    )
    if last is not None and last.committed_at is not None:
        since = since.where(col(Annotation.created_at) > last.committed_at)
    return QueueStatus(
        selected=int(counts.get(ItemStatus.SELECTED, 0)),
        queued=int(counts.get(ItemStatus.QUEUED, 0)),
        open_label_tasks=int(tasks.get("label", 0)),
        reviews_pending=int(tasks.get("review", 0)),
        labels_since_last_version=int(session.exec(since).one()),
        last_version=last.version if last is not None else None,
        annotators=annotator_stats(session, project),
        agreement=agreement(session, project),
        hardest=[QueuedTask(*row) for row in open_rows],
        rejected_events=int(
            session.exec(
                select(func.count())
                .select_from(InboxEvent)
                .where(InboxEvent.project_id == project.id, col(InboxEvent.error).is_not(None))
            ).one()
        ),
        recent_rejections=rejected_events(session, project, newest=10),
    )


def annotator_stats(session: Session, project: Project) -> list[AnnotatorStats]:
    now = utcnow()
    day, week = now - timedelta(days=1), now - timedelta(days=7)
    rows = session.execute(
        sa.select(
            col(Annotation.annotator),
            func.count(),
            func.sum(sa.case((col(Annotation.created_at) >= day, 1), else_=0)),
            func.sum(sa.case((col(Annotation.created_at) >= week, 1), else_=0)),
        )
        .where(
            col(Annotation.project_id) == project.id,
            col(Annotation.source).in_(HUMAN_SOURCES),
            col(Annotation.cancelled).is_(False),
        )
        .group_by(col(Annotation.annotator))
        .order_by(col(Annotation.annotator))
    ).all()
    return [
        AnnotatorStats(annotator, int(d or 0), int(w or 0), int(total))
        for annotator, total, d, w in rows
    ]


def agreement(session: Session, project: Project) -> Agreement:
    multi = session.execute(
        # A literal 1, so PostgreSQL can match the partial index ix_item_multi_annotated.
        sa.select(col(Item.label), col(Item.disagreement)).where(
            col(Item.project_id) == project.id, col(Item.n_annotators) > sa.literal_column("1")
        )
    ).all()
    per_class: dict[str, list[int]] = {}
    for label, disagree in multi:
        entry = per_class.setdefault(label or "(none)", [0, 0])
        entry[0] += 1
        entry[1] += 0 if disagree else 1
    agreeing = sum(1 for _, disagree in multi if not disagree)
    return Agreement(
        multi_annotated=len(multi),
        agreeing=agreeing,
        rate=agreeing / len(multi) if multi else None,
        per_class=per_class,
    )


@dataclass(frozen=True)
class ItemHistory:
    item: Item
    annotations: list[Annotation]


def item_history(session: Session, project: Project, external_id: str) -> ItemHistory:
    item = session.exec(
        select(Item).where(Item.project_id == project.id, Item.external_id == external_id)
    ).first()
    if item is None:
        raise NotFound(f"project {project.name!r} has no item {external_id!r}")
    annotations = session.exec(
        select(Annotation)
        .where(Annotation.item_id == item.id)
        .order_by(col(Annotation.created_at), col(Annotation.id))
    ).all()
    return ItemHistory(item, list(annotations))
