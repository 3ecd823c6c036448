"""The state database's tables (SQLModel) and the status machines that guard their rows.

Labels are the expensive asset, so every human answer is an `Annotation` row that is never
updated in place except to mark it withdrawn; an item's current label is derived from them
(`services.state.recompute_label`). Status columns change only through `services.state`, which
checks the transition tables below with a conditional UPDATE, so a concurrent writer cannot be
silently overwritten.

Timestamps are timezone-aware UTC. JSON columns hold plain lists/dicts.
"""

from datetime import UTC, datetime
from enum import StrEnum
from itertools import pairwise
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Now, timezone-aware UTC (what every timestamp column stores)."""
    return datetime.now(UTC)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timestamp that is timezone-aware UTC on the way in and out, on every backend.

    SQLite keeps no zone, so without this a value read back from SQLite would be naive while the
    same value from PostgreSQL is aware, and comparing the two raises.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use an aware datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class ItemStatus(StrEnum):
    """Where an item is in the labeling loop."""

    UNLABELED = "unlabeled"
    SELECTED = "selected"  # chosen by a cycle, not yet confirmed by the labeling tool
    QUEUED = "queued"  # the labeling tool confirmed its task
    LABELED = "labeled"
    IN_REVIEW = "in_review"  # labeled, sent back for a label-noise review
    UNREADABLE = "unreadable"  # its data could not be decoded at registration; never selected


# Every allowed status change. An annotation arriving makes an item labeled from any live state
# (annotators may answer before our hand-off is confirmed); a withdrawn label returns it to
# unlabeled; unreadable is final.
ITEM_TRANSITIONS: dict[ItemStatus, frozenset[ItemStatus]] = {
    ItemStatus.UNLABELED: frozenset({ItemStatus.SELECTED, ItemStatus.LABELED}),
    ItemStatus.SELECTED: frozenset({ItemStatus.QUEUED, ItemStatus.UNLABELED, ItemStatus.LABELED}),
    ItemStatus.QUEUED: frozenset({ItemStatus.LABELED, ItemStatus.UNLABELED}),
    ItemStatus.LABELED: frozenset({ItemStatus.IN_REVIEW, ItemStatus.UNLABELED}),
    ItemStatus.IN_REVIEW: frozenset({ItemStatus.LABELED, ItemStatus.UNLABELED}),
    ItemStatus.UNREADABLE: frozenset(),
}


class CycleState(StrEnum):
    """A cycle's lifecycle; it never waits for humans (hand-off ends it)."""

    PENDING = "pending"
    TRAINING = "training"
    SCORING = "scoring"
    SELECTING = "selecting"
    HANDING_OFF = "handing_off"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Ids and counts are 32-bit INTEGER columns on PostgreSQL: larger values are refused as input
# before they reach a query, where they would fail as a database error.
MAX_INT32 = 2**31 - 1

FINAL_CYCLE_STATES = frozenset({CycleState.DONE, CycleState.FAILED, CycleState.CANCELLED})
_RUNNING_ORDER = [
    CycleState.PENDING,
    CycleState.TRAINING,
    CycleState.SCORING,
    CycleState.SELECTING,
    CycleState.HANDING_OFF,
    CycleState.DONE,
]
# Each running state moves to the next one, or ends as failed/cancelled. Skipping is allowed only
# from pending to scoring (a cold start has no model to train yet) and selecting (nothing to score).
CYCLE_TRANSITIONS: dict[CycleState, frozenset[CycleState]] = {
    **{
        state: frozenset({nxt, CycleState.FAILED, CycleState.CANCELLED})
        for state, nxt in pairwise(_RUNNING_ORDER)
    },
    CycleState.DONE: frozenset(),
    CycleState.FAILED: frozenset(),
    CycleState.CANCELLED: frozenset(),
}
CYCLE_TRANSITIONS[CycleState.PENDING] = CYCLE_TRANSITIONS[CycleState.PENDING] | {
    CycleState.SCORING,
    CycleState.SELECTING,
}


class ChunkState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Promotion(StrEnum):
    """A model version's promotion decision."""

    CANDIDATE = "candidate"
    CURRENT = "current"
    REJECTED = "rejected"
    RETIRED = "retired"  # was current, replaced or rolled back


class LabelTaskState(StrEnum):
    """A task in the labeling tool, as far as we know."""

    PENDING = "pending"  # we intend to create it; not confirmed by the tool yet
    OPEN = "open"  # the tool confirmed it (and gave its id)
    ANSWERED = "answered"  # answer ingested; a skip leaves it open, a deleted answer reopens it


class DatasetVersionState(StrEnum):
    ALLOCATED = "allocated"  # number taken, manifest not yet written (a crash leaves this)
    COMMITTED = "committed"


class Project(SQLModel, table=True):
    """A labeling project. `name` is the public key (a slug); `id` is internal."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=40, unique=True, index=True)
    labels: list[str] = Field(sa_type=sa.JSON, description="Class names in index order.")
    modality: str = Field(max_length=16, description="features | image")
    store_url: str = Field(max_length=1024, description="file:///dir or s3://bucket/prefix")
    image_size: int | None = Field(default=None, description="Side of stored images, pixels.")
    image_channels: int | None = Field(default=None, description="1 = grayscale, 3 = RGB.")
    feature_dim: int | None = Field(default=None, description="Fixed by the first pool add.")
    loss_config: dict[str, Any] = Field(sa_type=sa.JSON, description="LossSpec.to_dict()")
    selection_config: dict[str, Any] = Field(sa_type=sa.JSON, description="SelectionConfig")
    batch_size: int = Field(default=50)
    label_budget: int | None = Field(default=None, description="Human labels; None = no cap.")
    retrain_min_new_labels: int = Field(default=100)
    retrain_cron: str | None = Field(default=None, max_length=120)
    paused: bool = Field(default=False)
    gate: dict[str, Any] = Field(
        default_factory=dict,
        sa_type=sa.JSON,
        description="Promotion gate and evaluation set settings (services.gate.GateConfig).",
    )
    labeler: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "none"},
        sa_type=sa.JSON,
        description="Who answers hand-offs: {kind: none | simulated | label_studio, ...}.",
    )
    refill_below: int = Field(default=0, description="Start a cycle under this many open tasks.")
    seed: int = Field(default=0, description="Cycles' random choices derive from it: runs repeat.")
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


# Conditions of partial unique indexes: a project's one active cycle, an item's label tasks.
ACTIVE = "state NOT IN ('done', 'failed', 'cancelled')"
LABEL, OPEN_REVIEW = "kind = 'label'", "kind = 'review' AND state != 'answered'"


def _where(condition: str) -> dict[str, Any]:
    """A partial index's condition, on both backends."""
    return {"sqlite_where": sa.text(condition), "postgresql_where": sa.text(condition)}


class Item(SQLModel, table=True):
    """One pool item. `label` mirrors the newest live annotation (kept in step by
    `services.state`); `shard_key`/`shard_row` locate its decoded data in the columnar pool."""

    __table_args__ = (
        sa.UniqueConstraint("project_id", "external_id", name="uq_item_external_id"),
        sa.UniqueConstraint("project_id", "content_hash", name="uq_item_content_hash"),
        sa.Index("ix_item_project_status", "project_id", "status"),
        # The console's lists (refused answers, the evaluation set): a few items of a large pool.
        sa.Index("ix_item_label_issue", "project_id", **_where("label_issue IS NOT NULL")),
        sa.Index("ix_item_eval_set", "project_id", "status", **_where("eval_set")),
        sa.Index("ix_item_multi_annotated", "project_id", **_where("n_annotators > 1")),
    )

    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="project.id")
    external_id: str = Field(max_length=200, description="The item id users and tools see.")
    uri: str = Field(max_length=2048)
    content_hash: str = Field(max_length=64, description="SHA-256 of the source bytes, hex.")
    status: str = Field(default=ItemStatus.UNLABELED, max_length=16)
    status_reason: str | None = Field(default=None, max_length=1000)
    shard_key: str | None = Field(default=None, max_length=1024)
    shard_row: int | None = Field(default=None)
    label: str | None = Field(default=None, max_length=200)
    label_source: str | None = Field(default=None, max_length=40)
    annotator: str | None = Field(default=None, max_length=200)
    labeled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    n_annotators: int = Field(default=0, description="Annotators with a live answer.")
    disagreement: bool = Field(default=False, description="Live answers name >1 class.")
    registered_from: str = Field(max_length=2048, description="The pool source it came from.")
    label_issue: str | None = Field(
        default=None,
        max_length=1000,
        description="Why the last answer from a labeling tool was rejected (e.g. a label outside "
        "the label set); cleared when an answer is accepted.",
    )
    eval_set: bool = Field(
        default=False,
        description="Reserved for the project's evaluation set: labeled first, never trained "
        "on or selected by a strategy. Set once, while unlabeled, and never cleared.",
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Annotation(SQLModel, table=True):
    """One human (or seed/simulated) answer, kept forever. A revision of an external annotation
    (Label Studio's ANNOTATION_UPDATED) is a new row with the same external_id and a newer
    external_updated_at; that pair is the idempotency key, so a duplicate event stores nothing."""

    __table_args__ = (
        sa.UniqueConstraint(
            "project_id",
            "source",
            "external_id",
            "external_updated_at",
            name="uq_annotation_revision",
        ),
        sa.Index("ix_annotation_item", "item_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="project.id")
    item_id: int = Field(foreign_key="item.id")
    label: str | None = Field(default=None, max_length=200, description="None when cancelled.")
    cancelled: bool = Field(default=False, description="Skipped / cancelled: gives no label.")
    withdrawn_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    source: str = Field(max_length=40, description="seed | cli | simulated | label_studio | review")
    external_id: str = Field(max_length=200, description="The source's id of this annotation.")
    external_updated_at: datetime = Field(sa_type=UTCDateTime)
    annotator: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class AnnotationTombstone(SQLModel, table=True):
    """A deleted external annotation: any revision of it arriving later is a no-op (Label
    Studio never reuses an annotation id)."""

    __table_args__ = (
        sa.UniqueConstraint("project_id", "source", "external_id", name="uq_annotation_tombstone"),
    )

    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="project.id")
    source: str = Field(max_length=40)
    external_id: str = Field(max_length=200)
    deleted_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class WorkerHeartbeat(SQLModel, table=True):
    """A consuming worker's sign of life (what `/ready` reads), written by its event loop."""

    name: str = Field(primary_key=True, max_length=200, description="Celery's node name.")
    queues: str = Field(max_length=400, description="The queues it consumes, comma separated.")
    pid: int
    beat_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DatasetVersion(SQLModel, table=True):
    """A dataset version's number (allocated here, unique per project) and its commit record.
    The manifest in the store is the data's truth; this row is the index and the allocator."""

    __table_args__ = (sa.UniqueConstraint("project_id", "version", name="uq_dataset_version"),)

    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="project.id")
    version: int
    parent_version: int | None = Field(default=None)
    state: str = Field(default=DatasetVersionState.ALLOCATED, max_length=16)
    cycle_id: int | None = Field(default=None)
    manifest_key: str | None = Field(default=None, max_length=1024)
    manifest_sha256: str | None = Field(default=None, max_length=64)
    row_count: int | None = Field(default=None)
    class_counts: dict[str, int] | None = Field(default=None, sa_type=sa.JSON)
    label_set_hash: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    committed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ModelVersion(SQLModel, table=True):
    """A trained model: what it was trained on, how it scored, and whether it became current."""

    __table_args__ = (sa.UniqueConstraint("project_id", "version", name="uq_model_version"),)

    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="project.id")
    version: int
    dataset_version: int = Field(description="The DatasetVersion.version it was trained on.")
    cycle_id: int | None = Field(default=None)
    artifact_uri: str = Field(max_length=2048)
    parameters: dict[str, Any] = Field(sa_type=sa.JSON)
    metrics: dict[str, Any] = Field(sa_type=sa.JSON)
    summary: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)  # services.curve
    promotion: str = Field(default=Promotion.CANDIDATE, max_length=16)
    promotion_reason: str | None = Field(default=None, max_length=2000)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    promoted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Cycle(SQLModel, table=True):
    """One pass of train -> score -> select -> hand off. The partial unique index allows at most
    one non-final cycle per project, enforced by the database rather than a check-then-insert."""

    __table_args__ = (
        sa.Index("uq_cycle_one_active_per_project", "project_id", unique=True, **_where(ACTIVE)),
        sa.UniqueConstraint("project_id", "number", name="uq_cycle_number"),
    )

    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="project.id", index=True)
    number: int = Field(description="1, 2, 3... within the project; seeds derive from it.")
    state: str = Field(default=CycleState.PENDING, max_length=16)
    trigger: str = Field(max_length=200, description="Why it started (cli, new labels, cron).")
    dataset_version: int | None = Field(default=None)
    model_version: int | None = Field(default=None)
    failure_reason: str | None = Field(default=None, max_length=4000)
    last_error: str | None = Field(default=None, max_length=4000, description="Newest, kept.")
    note: str | None = Field(default=None, max_length=400, description="e.g. why none selected")
    last_error_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    cancel_requested: bool = Field(default=False)
    train_attempts: int = Field(default=0)
    selected_count: int | None = Field(default=None)
    cold_start_picks: int | None = Field(default=None)
    timeline: list[dict[str, str]] = Field(
        default_factory=list, sa_type=sa.JSON, description="[{state, at (ISO 8601)}]"
    )
    chunks_total: int | None = Field(default=None)
    chunks_done: int = Field(default=0)
    progress: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)  # cycle/progress.py
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    deadline_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ScoreChunk(SQLModel, table=True):
    """One scoring work unit of a cycle, leased by a worker; attempts count redeliveries."""

    __table_args__ = (sa.UniqueConstraint("cycle_id", "index", name="uq_chunk_index"),)

    id: int | None = Field(default=None, primary_key=True)
    cycle_id: int = Field(foreign_key="cycle.id", index=True)
    index: int
    shard_key: str = Field(max_length=1024)
    state: str = Field(default=ChunkState.PENDING, max_length=16)
    attempts: int = Field(default=0)
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    worker: str | None = Field(default=None, max_length=200)
    result_key: str | None = Field(default=None, max_length=1024, description="candidates")
    scores_key: str | None = Field(default=None, max_length=1024, description="per-item scores")
    items_scored: int | None = Field(default=None)
    error: str | None = Field(default=None, max_length=4000)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class CycleSelection(SQLModel, table=True):
    """One item a cycle chose, in labeling order (rank 0 = hardest), with the model's view of it
    (None for cold-start picks). Written once per cycle, so a redelivered select does nothing."""

    __table_args__ = (sa.UniqueConstraint("cycle_id", "item_id", name="uq_selection_item"),)

    id: int | None = Field(default=None, primary_key=True)
    cycle_id: int = Field(foreign_key="cycle.id", index=True)
    item_id: int = Field(foreign_key="item.id")
    rank: int
    score: float | None = Field(default=None, description="Strategy score; higher = harder.")
    predicted_label: str | None = Field(default=None, max_length=200)
    probability: float | None = Field(default=None, description="Predicted class probability.")
    model_version: int | None = Field(default=None)
    cold_start: bool = Field(default=False)
    evaluation: bool = Field(default=False, description="An evaluation-set item, picked first.")


class InboxEvent(SQLModel, table=True):
    """A raw event from an external system, stored before it is processed; the unique key makes
    a duplicate delivery a no-op."""

    __table_args__ = (sa.UniqueConstraint("source", "event_key", name="uq_inbox_event"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=40)
    event_key: str = Field(max_length=400)
    action: str = Field(max_length=60)
    project_id: int | None = Field(default=None)
    payload: dict[str, Any] = Field(sa_type=sa.JSON)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    processed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    error: str | None = Field(default=None, max_length=4000)


class LabelTask(SQLModel, table=True):
    """A task in the labeling tool for one item: `label` (selected by a cycle) or `review` (a
    labeled item the model confidently contradicts).

    An item has at most one label task ever (re-selecting it reuses the task) and at most one
    review task that is not answered; partial unique indexes enforce both, so a redelivered
    hand-off cannot create a second one. `attempted_at` is set before the tool is asked to create
    the task: a pending row with it set may exist in the tool already (an import that timed out)
    and is reconciled by item id before anything is imported again.
    """

    __table_args__ = (
        sa.Index("uq_label_task_per_item", "project_id", "item_id", unique=True, **_where(LABEL)),
        sa.Index(
            "uq_review_task_open_per_item",
            "project_id",
            "item_id",
            unique=True,
            **_where(OPEN_REVIEW),
        ),
        sa.UniqueConstraint("project_id", "external_task_id", name="uq_label_task_external"),
        sa.Index("ix_labeltask_project_state", "project_id", "state"),
    )

    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="project.id")
    item_id: int = Field(foreign_key="item.id", index=True)
    kind: str = Field(max_length=16, description="label | review")
    state: str = Field(default=LabelTaskState.PENDING, max_length=16)
    cycle_id: int | None = Field(default=None, description="The cycle that asked for it.")
    external_task_id: int | None = Field(default=None, description="The tool's task id.")
    model_version: str | None = Field(default=None, max_length=200)
    prediction_label: str | None = Field(default=None, max_length=200)
    prediction_score: float | None = Field(default=None, description="Probability; low = hard.")
    note: str = Field(default="", max_length=1000, description="Shown to the annotator.")
    attempted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class TokenScope(StrEnum):
    """What an API token may do; each scope includes the ones before it."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


SCOPE_ORDER = [TokenScope.READ, TokenScope.WRITE, TokenScope.ADMIN]


class ApiToken(SQLModel, table=True):
    """A bearer token for the REST API. Only the SHA-256 of the secret is stored (the tokens are
    32 random bytes, so a slow hash would add nothing); the secret is shown once, at creation."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100, description="What it is for (shown in lists and audit).")
    token_hash: str = Field(max_length=64, unique=True, description="SHA-256 of the secret, hex.")
    scope: str = Field(max_length=16, description="read | write | admin")
    project_id: int | None = Field(
        default=None, foreign_key="project.id", description="Only this project; None = all."
    )
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_by: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class AuditEntry(SQLModel, table=True):
    """Who did what, when: every trigger, promotion, rollback, cancel and token change."""

    __table_args__ = (sa.Index("ix_auditentry_project_at", "project_id", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    actor: str = Field(max_length=200, description="token:<id>:<name>, cli:<user> or beat.")
    action: str = Field(max_length=60, description="e.g. cycle.start, model.promote")
    project_id: int | None = Field(default=None, foreign_key="project.id")
    target: str = Field(default="", max_length=400, description="What it acted on.")
    detail: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
