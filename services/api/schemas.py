"""The API's request bodies (`*Create`, `*Update`, strict: unknown fields are refused) and
responses (`*Public`)."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from services.models import (
    MAX_INT32,
    Annotation,
    Cycle,
    CycleState,
    DatasetVersion,
    Item,
    Project,
)
from services.projects import CLEARABLE, MAX_BATCH, PoolCounts
from services.status import CycleView

Name = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,38}[a-z0-9]$", description="3-40 a-z, 0-9, -")
# A class name as services.projects.check_labels accepts it: 1-200 characters, no commas or
# control characters, no surrounding white space.
ClassName = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00-\x1f,\s](?:[^\x00-\x1f,]*[^\x00-\x1f,\s])?$",
    ),
]
Cron = Annotated[
    str,
    StringConstraints(
        max_length=120,
        pattern=r"^[0-9*/,A-Za-z-]+( [0-9*/,A-Za-z-]+){4}$",
    ),
]
LabelSet = Field(
    min_length=2,
    max_length=1000,
    json_schema_extra={"uniqueItems": True},
    description="Class names in index order (distinct).",
)


class Problem(BaseModel):
    """An error: `detail` says what was wrong (a list of field errors for malformed bodies)."""

    detail: str | list[dict[str, Any]]


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "no valid API token"},
    403: {"model": Problem, "description": "the token may not do this"},
    404: {"model": Problem, "description": "no such project, item, cycle, model or version"},
    409: {"model": Problem, "description": "conflicts with the current state; nothing changed"},
    422: {"model": Problem, "description": "invalid input; nothing changed"},
}


class Strict(BaseModel):
    """A request body: unknown fields are refused, and so are NaN and infinities, which
    Python's JSON reader accepts but no model input or stored setting can mean."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ProjectCreate(Strict):
    name: str = Name
    labels: list[ClassName] = LabelSet
    modality: Literal["features", "image"]
    store_url: str | None = Field(
        default=None,
        max_length=1024,
        description="Dataset store under one of FOCALLOOP_STORE_ROOTS; default: a folder under "
        "the data dir.",
    )
    image_size: int = Field(default=32, ge=8, le=1024)
    image_channels: Literal[1, 3] = 1
    loss: dict[str, Any] | None = Field(default=None, description="gamma, alpha, ... (LossSpec)")
    selection: dict[str, Any] | None = Field(
        default=None, description="strategy and wrappers (SelectionConfig)"
    )
    batch_size: int = Field(default=50, ge=1, le=MAX_BATCH)
    label_budget: int | None = Field(default=None, ge=1, le=MAX_INT32)
    retrain_min_new_labels: int = Field(default=100, ge=1, le=MAX_INT32)
    retrain_cron: Cron | None = None
    refill_below: int | None = Field(
        default=None,
        ge=0,
        le=MAX_BATCH,
        description="Start the next cycle when fewer tasks than this wait for an answer "
        "(0: off; default: batch_size).",
    )
    gate: dict[str, Any] | None = Field(
        default=None, description="Evaluation set and promotion gate (GateConfig)"
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=MAX_INT32,
        description="Every random choice of its cycles derives from it.",
    )


class ProjectUpdate(Strict):
    labels: list[ClassName] | None = Field(
        default=None,
        min_length=2,
        max_length=1000,
        json_schema_extra={"uniqueItems": True},
        description="The new label set: classes may only be added.",
    )
    loss: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    batch_size: int | None = Field(default=None, ge=1, le=MAX_BATCH)
    label_budget: int | None = Field(
        default=None, ge=1, le=MAX_INT32, description="null: no budget."
    )
    retrain_min_new_labels: int | None = Field(default=None, ge=1, le=MAX_INT32)
    retrain_cron: Cron | None = Field(default=None, description="null: no cron.")
    refill_below: int | None = Field(default=None, ge=0, le=MAX_BATCH, description="0: off.")
    gate: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_INT32)

    @model_validator(mode="after")
    def _null_only_where_it_unsets(self) -> "ProjectUpdate":
        nulls = {name for name in self.model_fields_set if getattr(self, name) is None}
        if nulls - CLEARABLE:
            raise ValueError(
                f"{sorted(nulls - CLEARABLE)} cannot be null (leave a field out to keep it); "
                f"only {sorted(CLEARABLE)} can be unset"
            )
        return self

    def cleared(self) -> set[str]:
        """The settings this update unsets (given as null)."""
        return {name for name in self.model_fields_set & CLEARABLE if getattr(self, name) is None}


class ProjectPublic(BaseModel):
    name: str
    labels: list[str]
    modality: str
    store_url: str
    image_size: int | None
    image_channels: int | None
    feature_dim: int | None
    loss: dict[str, Any]
    selection: dict[str, Any]
    gate: dict[str, Any]
    batch_size: int
    label_budget: int | None
    retrain_min_new_labels: int
    retrain_cron: str | None
    refill_below: int
    paused: bool
    labeler: str
    seed: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, project: Project) -> "ProjectPublic":
        return cls(
            name=project.name,
            labels=list(project.labels),
            modality=project.modality,
            store_url=project.store_url,
            image_size=project.image_size,
            image_channels=project.image_channels,
            feature_dim=project.feature_dim,
            loss=dict(project.loss_config),
            selection=dict(project.selection_config),
            gate=dict(project.gate),
            batch_size=project.batch_size,
            label_budget=project.label_budget,
            retrain_min_new_labels=project.retrain_min_new_labels,
            retrain_cron=project.retrain_cron,
            refill_below=project.refill_below,
            paused=project.paused,
            labeler=str(project.labeler.get("kind", "none")),
            seed=project.seed,
            created_at=project.created_at,
            updated_at=project.updated_at,
        )


class PoolAdd(Strict):
    source: str = Field(
        min_length=1,
        max_length=2048,
        description="A folder, manifest or .npz under one of FOCALLOOP_SOURCE_ROOTS.",
    )


class PoolAddPublic(BaseModel):
    source: str
    seen: int
    added: int
    duplicates: int
    seed_labels: int
    unreadable: int
    shards: int


class PoolPublic(BaseModel):
    by_status: dict[str, int]
    total: int
    disagreements: int
    evaluation_set: int

    @classmethod
    def of(cls, counts: PoolCounts, evaluation_set: int) -> "PoolPublic":
        return cls(
            by_status=counts.by_status,
            total=counts.total,
            disagreements=counts.disagreements,
            evaluation_set=evaluation_set,
        )


class AnnotationPublic(BaseModel):
    label: str | None
    cancelled: bool
    source: str
    annotator: str
    external_id: str
    external_updated_at: datetime
    created_at: datetime
    withdrawn_at: datetime | None

    @classmethod
    def of(cls, row: Annotation) -> "AnnotationPublic":
        return cls.model_validate(row, from_attributes=True)


class ItemPublic(BaseModel):
    external_id: str
    uri: str
    status: str
    status_reason: str | None
    label: str | None
    label_source: str | None
    annotator: str | None
    labeled_at: datetime | None
    n_annotators: int
    disagreement: bool
    label_issue: str | None
    eval_set: bool
    history: list[AnnotationPublic]

    @classmethod
    def of(cls, item: Item, history: list[Annotation]) -> "ItemPublic":
        return cls(
            external_id=item.external_id,
            uri=item.uri,
            status=item.status,
            status_reason=item.status_reason,
            label=item.label,
            label_source=item.label_source,
            annotator=item.annotator,
            labeled_at=item.labeled_at,
            n_annotators=item.n_annotators,
            disagreement=item.disagreement,
            label_issue=item.label_issue,
            eval_set=item.eval_set,
            history=[AnnotationPublic.of(row) for row in history],
        )


class TimelineEntry(BaseModel):
    state: str
    at: datetime


class CyclePublic(BaseModel):
    id: int
    number: int = Field(description="1, 2, 3... within the project.")
    state: str
    trigger: str
    dataset_version: int | None
    model_version: int | None = Field(description="The model that scored this cycle's pool.")
    failure_reason: str | None
    last_error: str | None = Field(
        description="The newest error a stage raised (with its stage and attempt), also while "
        "it is being retried; kept after a retry succeeds."
    )
    last_error_at: datetime | None
    train_attempts: int = Field(description="Training attempts claimed so far.")
    note: str | None = Field(description="What a user should know, e.g. why none was selected.")
    cancel_requested: bool
    chunks_total: int | None
    chunks_done: int
    progress: dict[str, Any] | None = Field(
        description="Training's newest epoch while the cycle trains: {epoch, epochs (at most; "
        "early stopping may end sooner), train_loss, val_loss (nats), started_at, at}."
    )
    items_scored: int
    scoring_items_per_s: float | None
    selected_count: int | None
    cold_start_picks: int | None
    timeline: list[TimelineEntry]
    durations_s: dict[str, float] = Field(description="Seconds spent in each state left.")
    duration_s: float | None = Field(description="Creation to end, seconds (None while running).")
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, view: CycleView) -> "CyclePublic":
        cycle: Cycle = view.cycle
        return cls(
            id=cycle.id or 0,
            number=cycle.number,
            state=cycle.state,
            trigger=cycle.trigger,
            dataset_version=cycle.dataset_version,
            model_version=cycle.model_version,
            failure_reason=cycle.failure_reason,
            last_error=cycle.last_error,
            last_error_at=cycle.last_error_at,
            train_attempts=cycle.train_attempts,
            note=cycle.note,
            cancel_requested=cycle.cancel_requested,
            chunks_total=cycle.chunks_total,
            chunks_done=cycle.chunks_done,
            progress=cycle.progress if cycle.state == CycleState.TRAINING else None,
            items_scored=view.items_scored,
            scoring_items_per_s=view.scoring_items_per_s,
            selected_count=cycle.selected_count,
            cold_start_picks=cycle.cold_start_picks,
            timeline=[TimelineEntry.model_validate(entry) for entry in cycle.timeline],
            durations_s=view.durations_s,
            duration_s=view.duration_s,
            created_at=cycle.created_at,
            finished_at=cycle.finished_at,
        )


class DatasetVersionPublic(BaseModel):
    version: int
    parent_version: int | None
    cycle_id: int | None
    row_count: int | None
    class_counts: dict[str, int] | None
    manifest_key: str | None
    manifest_sha256: str | None
    label_set_hash: str | None
    created_at: datetime
    committed_at: datetime | None

    @classmethod
    def of(cls, row: DatasetVersion) -> "DatasetVersionPublic":
        return cls.model_validate(row, from_attributes=True)


class RelabelPublic(BaseModel):
    item_id: str
    old: str
    new: str


class DiffPublic(BaseModel):
    a: int
    b: int
    added: list[str]
    withdrawn: list[str]
    relabeled: list[RelabelPublic]


class AnnotatorPublic(BaseModel):
    annotator: str
    last_24h: int
    last_7d: int
    total: int


class AgreementPublic(BaseModel):
    multi_annotated: int
    agreeing: int
    rate: float | None
    per_class: dict[str, list[int]] = Field(description="label -> [multi-annotated, agreeing]")


class QueuedTaskPublic(BaseModel):
    external_id: str
    task_id: int | None
    kind: str
    prediction_label: str | None
    prediction_score: float | None


class RejectedEventPublic(BaseModel):
    event_id: int
    received_at: datetime
    error: str


class QueuePublic(BaseModel):
    selected: int
    queued: int
    open_label_tasks: int
    reviews_pending: int
    labels_since_last_version: int
    last_version: int | None
    annotators: list[AnnotatorPublic]
    agreement: AgreementPublic
    hardest: list[QueuedTaskPublic] = Field(description="Open tasks, hardest (lowest p) first.")
    rejected_events: int = Field(
        description="Labeling-tool events ingest set aside (unknown label, malformed, ...)."
    )
    recent_rejections: list[RejectedEventPublic] = Field(
        description="The newest 10 of them with their reasons."
    )


class TokenCreate(Strict):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f]*\S[^\x00-\x1f]*$")
    scope: Literal["read", "write", "admin"]
    project: str | None = Field(default=None, description="Restrict it to this project.")
    expires_at: AwareDatetime | None = None


class TokenPublic(BaseModel):
    id: int
    name: str
    scope: str
    project: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    created_by: str
    created_at: datetime
    last_used_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="The secret: shown once, only its hash is stored.")


class AuditPublic(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    project: str | None
    target: str
    detail: dict[str, Any]


class CheckPublic(BaseModel):
    ok: bool
    detail: str


class ReadyPublic(BaseModel):
    ready: bool
    checks: dict[str, CheckPublic] | None = Field(
        default=None, description="Each check and its reason: only for a valid API token."
    )
