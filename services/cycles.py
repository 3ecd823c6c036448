"""The distributed cycle: each stage as a function over the database and the store.

    start_cycle        a pending cycle (one active per project, enforced by the database)
    train_cycle        claim (lease) -> load the dataset version -> train -> checkpoint ->
                       model version -> one score chunk per pool shard -> scoring
                       (or straight to selecting on a cold start)
    score_chunk        claim the chunk's lease (attempt + 1) -> score its still-unlabeled items ->
                       write per-item scores and candidates -> mark done; the chunk whose
                       completion makes the count reach the total says "select next"
    select_cycle       merge every chunk's candidates -> choose the batch -> items selected
    hand_off           give the batch to the project's labeler (simulated now)
    ingest_events      stored labeler events -> annotations
    maybe_start_cycle  beat's trigger: enough new labels (or the cron) -> snapshot -> start
    recover_stalled    beat's janitor: expired leases re-enqueued, exhausted ones failed

Every function is safe to run twice (a redelivered message does nothing new): claims are
conditional UPDATEs, completions are fenced by the attempt number that claimed the work, and
the database decides what has happened, not the broker. Celery tasks (`workers/tasks.py`) only
call these and enqueue what they return. Sessions are opened here because stages commit in
steps: the claim is committed before the long work starts, so another worker can see it.
"""

import io
import json
import logging
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa
from celery.schedules import crontab
from numpy.typing import NDArray
from sqlmodel import Session, col, func, select

from services import labelstudio, logs, promotion
from services.config import Settings
from services.datasets.pool import load_shard
from services.datasets.snapshot import get_version, snapshot
from services.datasets.store import DatasetStore, open_store, safe_key, sha256_hex
from services.datasets.versions import read_version
from services.db import session_scope
from services.errors import Conflict, InvalidInput, NotFound, PermanentError, TransientError
from services.loop import (
    LabeledSet,
    LoopConfig,
    SelectionConfig,
    default_loop_config,
    select_stage,
    train_stage,
)
from services.ml.checkpoint import SIDECAR_FILE, WEIGHTS_FILE, Checkpoint, load_checkpoint
from services.ml.checkpoint import save_checkpoint as save_checkpoint_dir
from services.ml.metrics import EvaluationReport, default_minority_class, evaluate
from services.ml.nets import spec_for_inputs
from services.ml.score import score
from services.ml.train import LossSpec, TrainResult
from services.models import (
    FINAL_CYCLE_STATES,
    Annotation,
    ChunkState,
    Cycle,
    CycleSelection,
    CycleState,
    DatasetVersion,
    DatasetVersionState,
    InboxEvent,
    Item,
    ItemStatus,
    ModelVersion,
    Project,
    Promotion,
    ScoreChunk,
    utcnow,
)
from services.projects import get_project, list_projects
from services.selection.candidates import Candidates, chunk_candidates, merge_candidates
from services.selection.cold_start import cold_start
from services.selection.strategies import make_strategy
from services.state import (
    AnnotationInput,
    create_cycle,
    record_annotation,
    transition_cycle,
    transition_items,
)

log = logging.getLogger("focalloop.cycles")
SIMULATED_SOURCE = "simulated"
COLD_START_SAMPLE = 20_000  # unlabeled items cold start clusters at most


# ----------------------------------------------------------------------------------- helpers


def loop_config(project: Project) -> LoopConfig:
    """The project's cycle settings on top of the measured defaults."""
    base = default_loop_config()
    return LoopConfig(
        loss=LossSpec.from_dict(project.loss_config),
        train=base.train,
        selection=SelectionConfig.from_dict(project.selection_config),
        batch_size=project.batch_size,
        warm_start_steps=base.warm_start_steps,
    )


def _store(project: Project, settings: Settings) -> DatasetStore:
    return open_store(project.store_url, settings, create=True)


class _BoundedCache:
    """A small per-process cache of immutable objects (write-once checkpoints), so a worker
    scoring chunk after chunk loads its model once. Keyed by store URL and key; Settings stay
    out of the key (they are not hashable and do not change the bytes)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: dict[tuple[str, str], Any] = {}
        self.lock = threading.Lock()

    def get(self, store_url: str, key: str, load: Callable[[], Any]) -> Any:
        with self.lock:
            if (store_url, key) in self.entries:
                return self.entries[(store_url, key)]
        value = load()
        with self.lock:
            if len(self.entries) >= self.size:
                self.entries.pop(next(iter(self.entries)))
            self.entries[(store_url, key)] = value
        return value


_MODELS = _BoundedCache(4)


def load_items(
    session: Session, project: Project, item_ids: Sequence[int], settings: Settings
) -> NDArray[np.float32]:
    """The decoded data of items (by database id), in the order given: [n, *item_shape].

    Each shard involved is read (and its hash checked) once per call. Nothing is cached across
    calls: a decoded image shard is hundreds of MB, and scoring reads each shard once anyway.
    """
    rows: dict[int, tuple[str | None, int | None]] = {}
    wanted = list(item_ids)
    for start in range(0, len(wanted), 5000):  # bounded IN lists on every backend
        rows.update(
            (item_id, (shard_key, shard_row))
            for item_id, shard_key, shard_row in session.execute(
                sa.select(col(Item.id), col(Item.shard_key), col(Item.shard_row)).where(
                    col(Item.id).in_(wanted[start : start + 5000])
                )
            )
        )
    missing = [i for i in item_ids if i not in rows or rows[i][0] is None]
    if missing:
        raise PermanentError(f"items {missing[:5]} have no decoded data in the pool")
    store = _store(project, settings)
    positions_by_shard: dict[str, list[int]] = {}
    for position, item_id in enumerate(item_ids):
        positions_by_shard.setdefault(str(rows[item_id][0]), []).append(position)
    output: NDArray[np.float32] | None = None
    for shard_key, positions in positions_by_shard.items():
        shard = load_shard(store, shard_key)
        if output is None:
            output = np.empty((len(item_ids), *shard.data.shape[1:]), dtype=np.float32)
        shard_rows = [int(rows[item_ids[p]][1] or 0) for p in positions]
        output[positions] = shard.data[shard_rows]
    assert output is not None
    return output


def human_labels_spent(session: Session, project: Project) -> int:
    """Items labeled by people (not seeds), for the label budget."""
    return int(
        session.exec(
            select(func.count(func.distinct(Annotation.item_id))).where(
                Annotation.project_id == project.id,
                Annotation.source != "seed",
                col(Annotation.cancelled).is_(False),
                col(Annotation.withdrawn_at).is_(None),
            )
        ).one()
    )


def current_model(session: Session, project: Project) -> ModelVersion | None:
    return session.exec(
        select(ModelVersion).where(
            ModelVersion.project_id == project.id, ModelVersion.promotion == Promotion.CURRENT
        )
    ).first()


def _model_prefix(project: Project, cycle_id: int, attempt: int) -> str:
    return safe_key(project.name, "models", f"c{cycle_id:08d}-a{attempt}")


def save_model(
    store: DatasetStore, project: Project, result: TrainResult, *, cycle_id: int, attempt: int
) -> str:
    """Write a trained model to the store (write-once); returns the folder's key."""
    prefix = _model_prefix(project, cycle_id, attempt)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        save_checkpoint_dir(
            folder,
            model=result.model,
            spec=result.spec,
            labels=list(project.labels),
            loss=result.loss,
            temperature=result.temperature,
            metadata={"cycle_id": cycle_id, "attempt": attempt},
        )
        for name in (WEIGHTS_FILE, SIDECAR_FILE):
            store.put_if_absent(f"{prefix}/{name}", (folder / name).read_bytes())
    return prefix


def _read_model(store_url: str, prefix: str, settings: Settings) -> Checkpoint:
    store = open_store(store_url, settings)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for name in (WEIGHTS_FILE, SIDECAR_FILE):
            (folder / name).write_bytes(store.get(f"{prefix}/{name}"))
        return load_checkpoint(folder)


def model_files(project: Project, model: ModelVersion, settings: Settings) -> dict[str, bytes]:
    """A model version's checkpoint files (weights and sidecar) as stored, by file name."""
    store = open_store(project.store_url, settings)
    return {
        name: store.get(f"{model.artifact_uri}/{name}") for name in (WEIGHTS_FILE, SIDECAR_FILE)
    }


def load_model(project: Project, model: ModelVersion, settings: Settings) -> Checkpoint:
    """A model version's checkpoint (verified on first load, then cached per process)."""
    checkpoint: Checkpoint = _MODELS.get(
        project.store_url,
        model.artifact_uri,
        lambda: _read_model(project.store_url, model.artifact_uri, settings),
    )
    return checkpoint


@contextmanager
def lease_renewal(renew: Callable[[], bool], every_s: float) -> Iterator[threading.Event]:
    """Call `renew` every `every_s` seconds in a background thread while the block runs. The
    yielded event is set when a renewal reports the lease lost (the work should be abandoned)."""
    stop = threading.Event()
    lost = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            if not renew():
                lost.set()
                return

    thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()


def _cancel_if_requested(session: Session, cycle: Cycle) -> bool:
    """Move a cycle whose cancel was requested to cancelled; True if it was."""
    if not cycle.cancel_requested or cycle.state in FINAL_CYCLE_STATES:
        return False
    _release_selection(session, cycle.id or 0)
    transition_cycle(session, cycle.id or 0, CycleState.CANCELLED)
    return True


def _release_selection(session: Session, cycle_id: int) -> None:
    """Items a cancelled or failed cycle selected but never handed off go back to unlabeled."""
    ids = [
        item_id
        for (item_id,) in session.execute(
            sa.select(col(CycleSelection.item_id))
            .join(Item, col(Item.id) == col(CycleSelection.item_id))
            .where(
                col(CycleSelection.cycle_id) == cycle_id,
                col(Item.status) == ItemStatus.SELECTED,
            )
        )
    ]
    transition_items(session, ids, ItemStatus.UNLABELED, expected=ItemStatus.SELECTED)


def fail_cycle(session: Session, cycle_id: int, reason: str) -> None:
    """Fail a cycle (if it is not final yet), releasing any selection it made."""
    cycle = session.get(Cycle, cycle_id)
    if cycle is None or cycle.state in FINAL_CYCLE_STATES:
        return
    _release_selection(session, cycle_id)
    transition_cycle(session, cycle_id, CycleState.FAILED, reason=reason[:4000])


# ------------------------------------------------------------------------------ start/cancel


def start_cycle(session: Session, project_name: str, *, trigger: str, settings: Settings) -> Cycle:
    """A new pending cycle on the project's newest committed dataset version.

    Refused (InvalidInput) for a paused project or a spent label budget; Conflict when the
    project already has an active cycle (the database's unique index decides, so concurrent
    starts yield exactly one cycle).
    """
    project = get_project(session, project_name)
    if project.paused:
        raise InvalidInput(f"project {project.name!r} is paused; resume it to start cycles")
    if project.label_budget is not None:
        spent = human_labels_spent(session, project)
        if spent >= project.label_budget:
            raise InvalidInput(
                f"project {project.name!r} has spent its label budget "
                f"({spent} of {project.label_budget})"
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
    promotion.reserve_eval_set(session, project, seed=cycle.id or 0)
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
        _cancel_if_requested(session, cycle)
    session.refresh(cycle)
    return cycle


def active_cycle(session: Session, project: Project) -> Cycle | None:
    return session.exec(
        select(Cycle).where(
            Cycle.project_id == project.id,
            col(Cycle.state).not_in([str(s) for s in FINAL_CYCLE_STATES]),
        )
    ).first()


# ------------------------------------------------------------------------------------ train


@dataclass(frozen=True)
class TrainOutcome:
    """What to enqueue next: `chunk_ids` to score, or `select` (cold start, nothing to score),
    or nothing (the cycle ended, or another worker holds it)."""

    chunk_ids: list[int] = field(default_factory=list)
    select: bool = False


def _claim_training(session: Session, cycle_id: int, settings: Settings) -> int | None:
    """Take the training lease: pending -> training, or re-take an expired one. Returns the
    attempt number (the fencing token), or None when the cycle is not ours to train."""
    now = utcnow()
    cycle = session.get(Cycle, cycle_id)
    if cycle is None or cycle.state not in (CycleState.PENDING, CycleState.TRAINING):
        return None
    if cycle.state == CycleState.PENDING:
        transition_cycle(session, cycle_id, CycleState.TRAINING)
    result = session.execute(
        sa.update(Cycle)
        .where(
            col(Cycle.id) == cycle_id,
            col(Cycle.state) == CycleState.TRAINING,
            col(Cycle.train_attempts) == cycle.train_attempts,
            sa.or_(col(Cycle.lease_expires_at).is_(None), col(Cycle.lease_expires_at) < now),
        )
        .values(
            train_attempts=Cycle.train_attempts + 1,
            lease_expires_at=now + timedelta(seconds=settings.lease_s),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    session.refresh(cycle)
    return cycle.train_attempts


def _renew_cycle_lease(engine: sa.Engine, cycle_id: int, attempt: int, settings: Settings) -> bool:
    with session_scope(engine) as session:
        result = session.execute(
            sa.update(Cycle)
            .where(
                col(Cycle.id) == cycle_id,
                col(Cycle.state) == CycleState.TRAINING,
                col(Cycle.train_attempts) == attempt,
            )
            .values(lease_expires_at=utcnow() + timedelta(seconds=settings.lease_s))
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _training_rows(
    session: Session, project: Project, version: int, settings: Settings
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Labels [m] (class indices) and item ids [m] (database ids) of a committed dataset
    version's training rows: every row but the evaluation set's, which is never trained on."""
    store = _store(project, settings)
    _, table = read_version(store, project.name, version)
    external_ids = table["item_id"].to_pylist()
    index = {label: i for i, label in enumerate(project.labels)}
    labels = [index[label] for label in table["label"].to_pylist()]
    found: dict[str, tuple[int, bool]] = {}
    for start in range(0, len(external_ids), 5000):
        chunk = external_ids[start : start + 5000]
        found.update(
            (external_id, (item_id, eval_set))
            for external_id, item_id, eval_set in session.execute(
                sa.select(col(Item.external_id), col(Item.id), col(Item.eval_set)).where(
                    col(Item.project_id) == project.id, col(Item.external_id).in_(chunk)
                )
            )
        )
    missing = [e for e in external_ids if e not in found]
    if missing:
        raise PermanentError(f"dataset v{version} names items not in the pool, e.g. {missing[:5]}")
    kept = [
        (found[e][0], label)
        for e, label in zip(external_ids, labels, strict=True)
        if not found[e][1]
    ]
    return (
        np.array([label for _, label in kept], dtype=np.int64),
        np.array([item_id for item_id, _ in kept], dtype=np.int64),
    )


def _training_data(
    session: Session, project: Project, version: int, settings: Settings
) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.int64]]:
    """items [m, *shape], labels [m] (class indices) and item ids [m] (database ids) of a
    committed dataset version's training rows."""
    labels, item_ids = _training_rows(session, project, version, settings)
    items = load_items(session, project, item_ids.tolist(), settings)
    return items, labels, item_ids


def _is_cold_start(session: Session, project: Project, cycle: Cycle, settings: Settings) -> bool:
    """Whether the cycle has too little training data for a model: fewer than two classes
    among the version's training rows (evaluation items do not count)."""
    if cycle.dataset_version is None:
        return True
    counts = get_version(session, project, cycle.dataset_version).class_counts or {}
    if sum(1 for count in counts.values() if count > 0) < 2:
        return True
    labels, _ = _training_rows(session, project, cycle.dataset_version, settings)
    return len(np.unique(labels)) < 2


# Scored each cycle: unlabeled items are the candidates; queued ones (waiting in the labeling
# tool) are scored too, so their tasks' predictions follow the current model.
SCORED_STATUSES = (ItemStatus.UNLABELED, ItemStatus.QUEUED)


def _unlabeled_shards(session: Session, project: Project) -> list[str]:
    return sorted(
        key
        for (key,) in session.execute(
            sa.select(col(Item.shard_key))
            .where(
                col(Item.project_id) == project.id,
                col(Item.status).in_(SCORED_STATUSES),
                col(Item.shard_key).is_not(None),
            )
            .distinct()
        )
    )


def train_cycle(engine: sa.Engine, cycle_id: int, settings: Settings) -> TrainOutcome:
    """Train the cycle's model and fan scoring out, or go straight to selection on a cold
    start. A redelivered message for a cycle that moved on, or whose lease another worker
    holds, does nothing."""
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        if cycle is None:
            raise NotFound(f"no cycle with id {cycle_id}")
        if _cancel_if_requested(session, cycle):
            return TrainOutcome()
        project = session.get(Project, cycle.project_id)
        assert project is not None
        logs.bind(project=project.name, cycle_id=cycle.id)
        if cycle.state == CycleState.PENDING and _is_cold_start(session, project, cycle, settings):
            transition_cycle(session, cycle_id, CycleState.SELECTING)
            return TrainOutcome(select=True)
        attempt = _claim_training(session, cycle_id, settings)
        if attempt is None:
            return TrainOutcome()
        if attempt > settings.max_train_attempts:
            fail_cycle(
                session,
                cycle_id,
                f"training did not finish in {settings.max_train_attempts} attempts "
                "(worker lost or lease expired each time)",
            )
            return TrainOutcome()
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        assert cycle is not None and cycle.dataset_version is not None
        project = session.get(Project, cycle.project_id)
        assert project is not None
        logs.bind(project=project.name, cycle_id=cycle.id)
        items, labels, item_ids = _training_data(session, project, cycle.dataset_version, settings)
        previous_row = current_model(session, project)
        previous = load_model(project, previous_row, settings) if previous_row else None
        config = loop_config(project)
        version = cycle.dataset_version
        gate = promotion.gate_config(project)
        evaluation = promotion.eval_labels(session, project)
        eval_items = (
            load_items(session, project, evaluation.item_ids, settings)
            if evaluation.item_ids
            else None
        )
    spec = spec_for_inputs(items.shape[1:], n_classes=len(project.labels))
    if previous is not None and previous.spec != spec:
        previous = None  # the label set grew: the old head does not fit
    try:
        with lease_renewal(
            lambda: _renew_cycle_lease(engine, cycle_id, attempt, settings), settings.lease_s / 3
        ) as lost:
            result = train_stage(
                items=items,
                dataset=LabeledSet(version, np.arange(len(labels), dtype=np.int64), labels),
                spec=spec,
                config=config,
                seed=cycle_id,
                previous=previous,
            )
            metrics, decision = _evaluate(
                project=project,
                result=result,
                training=(items, labels),
                evaluation=evaluation,
                eval_items=eval_items,
                previous=previous,
                has_current=previous_row is not None,
                gate=gate,
                settings=settings,
            )
    except PermanentError as error:
        # Retrying cannot help (a non-finite loss, data that cannot be used): fail the cycle now,
        # with the reason, instead of after every attempt's lease has run out.
        with session_scope(engine) as session:
            fail_cycle(session, cycle_id, f"training failed: {error}")
        return TrainOutcome()
    if lost.is_set():
        return TrainOutcome()  # another attempt owns the cycle now
    reviews = _review_candidates(project, items, labels, item_ids, cycle_id)
    store = _store(project, settings)
    prefix = save_model(store, project, result, cycle_id=cycle_id, attempt=attempt)
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        assert cycle is not None
        if cycle.state != CycleState.TRAINING or cycle.train_attempts != attempt:
            return TrainOutcome()
        if _cancel_if_requested(session, cycle):
            return TrainOutcome()
        model = _record_model(session, project, cycle, result, prefix, metrics, decision)
        # A rejected model is kept for the record; the current one goes on scoring.
        scorer = (
            model if decision.promotion == Promotion.CURRENT else current_model(session, project)
        )
        assert scorer is not None  # a model is rejected only against a current one
        labelstudio.plan_reviews(
            session,
            project,
            cycle_id,
            reviews,
            labelstudio.model_version_name(project, scorer.version),
        )
        shards = _unlabeled_shards(session, project)
        chunks = [
            ScoreChunk(cycle_id=cycle_id, index=i, shard_key=key) for i, key in enumerate(shards)
        ]
        session.add_all(chunks)
        cycle.model_version = scorer.version
        cycle.chunks_total = len(chunks)
        cycle.lease_expires_at = None
        session.add(cycle)
        session.flush()
        transition_cycle(session, cycle_id, CycleState.SCORING)
        if not chunks:
            transition_cycle(session, cycle_id, CycleState.SELECTING)
            return TrainOutcome(select=True)
        return TrainOutcome(chunk_ids=[chunk.id or 0 for chunk in chunks])


def _review_candidates(
    project: Project,
    items: NDArray[np.float32],
    labels: NDArray[np.int64],
    item_ids: NDArray[np.int64],
    seed: int,
) -> list[labelstudio.ReviewCandidate]:
    """Labeled items a cross-fitted model confidently contradicts (Label Studio projects only:
    the review goes back to people there)."""
    if project.labeler.get("kind") != labelstudio.KIND:
        return []
    link = labelstudio.LabelStudioLink.of(project)
    return labelstudio.review_candidates(
        items,
        labels,
        item_ids,
        n_classes=len(project.labels),
        threshold=link.review_threshold,
        limit=link.reviews_per_cycle,
        seed=seed,
    )


def _evaluate(
    *,
    project: Project,
    result: TrainResult,
    training: tuple[NDArray[np.float32], NDArray[np.int64]],
    evaluation: promotion.EvalLabels,
    eval_items: NDArray[np.float32] | None,
    previous: Checkpoint | None,
    has_current: bool,
    gate: promotion.GateConfig,
    settings: Settings,
) -> tuple[dict[str, Any], promotion.Decision]:
    """The new model's metrics (training curve, validation split, evaluation set, and the
    current model's evaluation for comparison) and the gate's decision.

    training: the items [m, *shape] and labels [m] it was trained on (the validation split is
    a subset). The minority class is the training set's least frequent one, for every report.
    """
    items, labels = training
    n_classes = len(project.labels)
    gamma = _scalar_gamma(result.loss)
    minority = default_minority_class(labels, n_classes)

    def report(
        model: Any, spec: Any, temperature: float, inputs: NDArray[np.float32], truth: list[int]
    ) -> EvaluationReport:
        probs = score(
            model, inputs, spec=spec, temperature=temperature, device=settings.device
        ).probs
        return evaluate(
            probs,
            np.asarray(truth, dtype=np.int64),
            minority_class=minority,
            focal_gamma=gamma,
        )

    validation = (
        report(
            result.model,
            result.spec,
            result.temperature,
            items[result.val_indices],
            labels[result.val_indices].tolist(),
        )
        if len(result.val_indices)
        else None
    )
    candidate = current = None
    if eval_items is not None:
        candidate = report(
            result.model, result.spec, result.temperature, eval_items, evaluation.labels
        )
        if previous is not None:
            current = report(
                previous.model, previous.spec, previous.temperature, eval_items, evaluation.labels
            )
    decision = promotion.decide(
        labels=list(project.labels),
        per_class_counts=evaluation.per_class(n_classes),
        candidate=candidate,
        current=current,
        config=gate,
        has_current=has_current,
    )
    metrics: dict[str, Any] = {
        "labels": list(project.labels),
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "val_error": result.val_error,
        "best_epoch": result.best_epoch,
        "temperature": result.temperature,
        "ece_before": result.ece_before,
        "ece_after": result.ece_after,
        "class_counts": dict(zip(project.labels, result.class_counts, strict=True)),
        "trained_items": len(result.train_indices),
        "validation_items": len(result.val_indices),
        "validation": validation.to_dict() if validation is not None else None,
        "evaluation": candidate.to_dict() if candidate is not None else None,
        "evaluation_of_current": current.to_dict() if current is not None else None,
        "evaluation_labels": dict(
            zip(project.labels, evaluation.per_class(n_classes), strict=True)
        ),
    }
    return metrics, decision


def _record_model(
    session: Session,
    project: Project,
    cycle: Cycle,
    result: TrainResult,
    prefix: str,
    metrics: dict[str, Any],
    decision: promotion.Decision,
) -> ModelVersion:
    """The model version row with the gate's decision; a promoted model retires the current
    one, a rejected one leaves it current."""
    number = (
        session.exec(
            select(func.max(ModelVersion.version)).where(ModelVersion.project_id == project.id)
        ).one()
        or 0
    ) + 1
    promoted = decision.promotion == Promotion.CURRENT
    previous = current_model(session, project)
    if promoted and previous is not None:
        previous.promotion = Promotion.RETIRED
        session.add(previous)
    model = ModelVersion(
        project_id=project.id or 0,
        version=number,
        dataset_version=cycle.dataset_version or 0,
        cycle_id=cycle.id,
        artifact_uri=prefix,
        parameters={
            "spec": result.spec.to_dict(),
            "loss": result.loss.to_dict(),
            "device": result.device,
            "autocast": result.autocast,
        },
        metrics=metrics,
        promotion=decision.promotion,
        promotion_reason=decision.reason[:2000],
        promoted_at=utcnow() if promoted else None,
    )
    session.add(model)
    session.flush()
    return model


# ------------------------------------------------------------------------------------ score


@dataclass(frozen=True)
class ChunkOutcome:
    """select: this chunk completed scoring of cycle `cycle_id`, so selection runs next."""

    select: bool = False
    scored: int = 0
    cycle_id: int = 0


def _claim_chunk(session: Session, chunk_id: int, worker: str, settings: Settings) -> int | None:
    now = utcnow()
    chunk = session.get(ScoreChunk, chunk_id)
    if chunk is None:
        raise NotFound(f"no score chunk with id {chunk_id}")
    result = session.execute(
        sa.update(ScoreChunk)
        .where(
            col(ScoreChunk.id) == chunk_id,
            col(ScoreChunk.attempts) == chunk.attempts,
            sa.or_(
                col(ScoreChunk.state) == ChunkState.PENDING,
                sa.and_(
                    col(ScoreChunk.state) == ChunkState.RUNNING,
                    col(ScoreChunk.lease_expires_at) < now,
                ),
            ),
        )
        .values(
            state=ChunkState.RUNNING,
            attempts=ScoreChunk.attempts + 1,
            lease_expires_at=now + timedelta(seconds=settings.lease_s),
            worker=worker[:200],
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    session.refresh(chunk)
    return chunk.attempts


def _fail_chunk(session: Session, chunk: ScoreChunk, reason: str) -> None:
    chunk.state = ChunkState.FAILED
    chunk.error = reason[:4000]
    chunk.lease_expires_at = None
    session.add(chunk)
    session.flush()
    fail_cycle(session, chunk.cycle_id, f"score chunk {chunk.index} failed: {reason}"[:4000])


def _per_item_scores(
    item_ids: NDArray[np.int64],
    probs: NDArray[np.float32],
    gamma: float,
    labels: Sequence[str],
    model_version: int,
) -> pa.Table:
    """Per-item scores: max prob, predicted class, margin, entropy, expected focal loss."""
    clipped = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    top2 = -np.sort(-probs, axis=1)[:, :2]
    predicted = probs.argmax(axis=1)
    return pa.table(
        {
            "item_id": pa.array(item_ids, pa.int64()),
            "max_prob": pa.array(top2[:, 0], pa.float32()),
            "predicted_class": pa.array(predicted, pa.int32()),
            "predicted_label": pa.array([labels[i] for i in predicted], pa.string()),
            "margin": pa.array(top2[:, 0] - top2[:, 1], pa.float32()),
            "entropy": pa.array(-(clipped * np.log(clipped)).sum(axis=1), pa.float32()),
            "expected_focal": pa.array(
                (clipped * (1 - clipped) ** gamma * -np.log(clipped)).sum(axis=1), pa.float32()
            ),
            "model_version": pa.array(np.full(len(item_ids), model_version), pa.int32()),
        }
    )


def candidates_to_table(candidates: Candidates) -> pa.Table:
    n, c = candidates.probs.shape
    d = candidates.embeddings.shape[1]
    return pa.table(
        {
            "item_id": pa.array(candidates.item_ids, pa.int64()),
            "score": pa.array(candidates.scores, pa.float32()),
            "probs": pa.FixedSizeListArray.from_arrays(pa.array(candidates.probs.ravel()), c),
            "embeddings": pa.FixedSizeListArray.from_arrays(
                pa.array(candidates.embeddings.ravel(), pa.float32()), d
            )
            if d
            else pa.array([[]] * n, pa.list_(pa.float32())),
        }
    )


def candidates_from_table(table: pa.Table) -> Candidates:
    n = table.num_rows

    def matrix(name: str) -> NDArray[np.float32]:
        column = table.column(name).combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        shaped = values.reshape(n, -1) if n else values.reshape(0, 0)
        return np.asarray(shaped, dtype=np.float32)

    return Candidates(
        table["item_id"].to_numpy().astype(np.int64),
        matrix("probs"),
        matrix("embeddings"),
        table["score"].to_numpy().astype(np.float32),
    )


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    # Measured on a 2,048-candidate chunk: Parquet's default dictionary encoding of the float
    # columns took 78 ms per write (and grew the file); without it, 14 ms. lz4: embeddings
    # barely compress, and zstd took 2.7x as long as lz4.
    pq.write_table(table, sink, compression="lz4", use_dictionary=False, write_statistics=False)
    return sink.getvalue()


def score_chunk(
    engine: sa.Engine,
    chunk_id: int,
    settings: Settings,
    *,
    worker: str,
    before_complete: Callable[[], None] | None = None,
) -> ChunkOutcome:
    """Score one chunk (one pool shard) of a scoring cycle.

    `before_complete` runs after the scores are written and before the chunk is marked done
    (tests use it to land faults mid-task).
    """
    with session_scope(engine) as session:
        attempt = _claim_chunk(session, chunk_id, worker, settings)
        if attempt is None:
            return ChunkOutcome()  # done, or another worker holds a live lease
        chunk = session.get(ScoreChunk, chunk_id)
        assert chunk is not None
        cycle = session.get(Cycle, chunk.cycle_id)
        assert cycle is not None
        if _cancel_if_requested(session, cycle) or cycle.state != CycleState.SCORING:
            return ChunkOutcome()
        if attempt > settings.max_chunk_attempts:
            _fail_chunk(session, chunk, f"gave up after {settings.max_chunk_attempts} attempts")
            return ChunkOutcome()
    try:
        return _score_claimed(engine, chunk_id, attempt, settings, before_complete)
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        with session_scope(engine) as session:
            retry = _release_chunk(session, chunk_id, attempt, reason, settings)
        # Raised after the release is committed (raising inside the block would roll it back).
        if retry:
            raise TransientError(
                f"score chunk {chunk_id}, attempt {attempt} failed ({reason}); will retry"
            ) from error
        return ChunkOutcome()


def _release_chunk(
    session: Session, chunk_id: int, attempt: int, reason: str, settings: Settings
) -> bool:
    """After a failed attempt: back to pending for a retry (True), or, on the last attempt,
    fail the chunk and its cycle with the reason (False). Fenced by the attempt number."""
    chunk = session.get(ScoreChunk, chunk_id)
    if chunk is None or chunk.state != ChunkState.RUNNING or chunk.attempts != attempt:
        return False
    if attempt >= settings.max_chunk_attempts:
        _fail_chunk(session, chunk, f"failed {attempt} times; last error: {reason}")
        return False
    chunk.state = ChunkState.PENDING
    chunk.error = reason[:4000]
    chunk.lease_expires_at = None
    chunk.updated_at = utcnow()
    session.add(chunk)
    return True


def _score_claimed(
    engine: sa.Engine,
    chunk_id: int,
    attempt: int,
    settings: Settings,
    before_complete: Callable[[], None] | None,
) -> ChunkOutcome:
    with session_scope(engine) as session:
        chunk = session.get(ScoreChunk, chunk_id)
        assert chunk is not None
        cycle = session.get(Cycle, chunk.cycle_id)
        assert cycle is not None
        project = session.get(Project, cycle.project_id)
        assert project is not None
        logs.bind(project=project.name, cycle_id=cycle.id)
        model_row = session.exec(
            select(ModelVersion).where(
                ModelVersion.project_id == project.id,
                ModelVersion.version == cycle.model_version,
            )
        ).one()
        # The chunk is one shard: read it once and keep the rows still unlabeled or queued now
        # (items labeled since the cycle started are not scored).
        rows = session.execute(
            sa.select(col(Item.id), col(Item.shard_row), col(Item.status), col(Item.eval_set))
            .where(
                col(Item.project_id) == project.id,
                col(Item.shard_key) == chunk.shard_key,
                col(Item.status).in_(SCORED_STATUSES),
            )
            .order_by(col(Item.id))
        ).all()
        item_ids = np.array([item_id for item_id, _, _, _ in rows], dtype=np.int64)
        # Only unlabeled items outside the evaluation set can be selected; queued ones get
        # per-item scores only (their tasks' predictions).
        selectable = np.array(
            [status == ItemStatus.UNLABELED and not in_eval for _, _, status, in_eval in rows],
            dtype=bool,
        )
        items = None
        if rows:
            shard = load_shard(_store(project, settings), chunk.shard_key)
            items = shard.data[np.array([int(row or 0) for _, row, _, _ in rows], dtype=np.int64)]
        config = loop_config(project)
        cycle_id = cycle.id or 0
        model_version = model_row.version
        checkpoint = load_model(project, model_row, settings)
    store = _store(project, settings)
    scored = 0
    candidates_key = scores_key = None
    if items is not None:
        output = score(
            checkpoint.model,
            items,
            spec=checkpoint.spec,
            temperature=checkpoint.temperature,
            device=settings.device,
        )
        gamma = _scalar_gamma(checkpoint.loss)
        strategy = make_strategy(config.selection.strategy, seed=cycle_id, gamma=gamma)
        chunk_scored = Candidates.build(
            item_ids[selectable],
            output.probs[selectable],
            strategy.scores(output.probs[selectable]),
            output.embeddings[selectable],
        )
        k_prime = config.batch_size * config.selection.candidate_multiplier()
        kept = chunk_candidates(chunk_scored, k_prime)
        folder = safe_key(project.name, "cycles", f"c{cycle_id:08d}")
        scores_body = _parquet_bytes(
            _per_item_scores(item_ids, output.probs, gamma, project.labels, model_version)
        )
        scores_key = f"{folder}/scores/{sha256_hex(scores_body)}.parquet"
        store.put_if_absent(scores_key, scores_body)
        candidates_body = _parquet_bytes(candidates_to_table(kept))
        candidates_key = f"{folder}/candidates/{sha256_hex(candidates_body)}.parquet"
        store.put_if_absent(candidates_key, candidates_body)
        scored = len(item_ids)
    if before_complete is not None:
        before_complete()
    with session_scope(engine) as session:
        now = utcnow()
        done = session.execute(
            sa.update(ScoreChunk)
            .where(
                col(ScoreChunk.id) == chunk_id,
                col(ScoreChunk.state) == ChunkState.RUNNING,
                col(ScoreChunk.attempts) == attempt,
            )
            .values(
                state=ChunkState.DONE,
                result_key=candidates_key,
                scores_key=scores_key,
                items_scored=scored,
                lease_expires_at=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            return ChunkOutcome()  # our lease was taken over; the other attempt completes it
        # In the same transaction as the completion, so exactly one chunk sees the last count.
        counted = session.execute(
            sa.update(Cycle)
            .where(col(Cycle.id) == cycle_id, col(Cycle.state) == CycleState.SCORING)
            .values(chunks_done=Cycle.chunks_done + 1, updated_at=now)
            .returning(col(Cycle.chunks_done), col(Cycle.chunks_total))
        ).first()
        if counted is None:
            return ChunkOutcome(scored=scored)
        chunks_done, chunks_total = counted
        if chunks_done == chunks_total:
            transition_cycle(session, cycle_id, CycleState.SELECTING)
            return ChunkOutcome(select=True, scored=scored, cycle_id=cycle_id)
        return ChunkOutcome(scored=scored)


def _scalar_gamma(loss: LossSpec) -> float:
    return float(np.mean(loss.gamma)) if isinstance(loss.gamma, tuple) else float(loss.gamma)


# ----------------------------------------------------------------------------------- select


def _label_counts(session: Session, project: Project, cycle: Cycle) -> NDArray[np.int64]:
    if cycle.dataset_version is None:
        return np.zeros(len(project.labels), dtype=np.int64)
    counts = get_version(session, project, cycle.dataset_version).class_counts or {}
    return np.array([counts.get(label, 0) for label in project.labels], dtype=np.int64)


def _batch_size(session: Session, project: Project) -> int:
    """The project's batch, capped by what is left of the label budget (queued items count as
    spent: they will be labeled)."""
    if project.label_budget is None:
        return project.batch_size
    queued = session.exec(
        select(func.count())
        .select_from(Item)
        .where(
            Item.project_id == project.id,
            col(Item.status).in_([ItemStatus.SELECTED, ItemStatus.QUEUED]),
        )
    ).one()
    left = project.label_budget - human_labels_spent(session, project) - int(queued)
    return max(0, min(project.batch_size, left))


def select_cycle(engine: sa.Engine, cycle_id: int, settings: Settings) -> bool:
    """Choose the batch from every chunk's candidates (or by cold start) and mark the items
    selected. Returns True when hand-off should run next. Runs once per cycle: a redelivery
    finds the cycle past selecting and does nothing."""
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        if cycle is None:
            raise NotFound(f"no cycle with id {cycle_id}")
        if _cancel_if_requested(session, cycle) or cycle.state != CycleState.SELECTING:
            return False
        project = session.get(Project, cycle.project_id)
        assert project is not None
        logs.bind(project=project.name, cycle_id=cycle.id)
        config = loop_config(project)
        # Evaluation items waiting for labels go first; the strategy fills the rest.
        batch_size = _batch_size(session, project)
        evaluation_ids = promotion.eval_picks(session, project, batch_size)
        batch_size -= len(evaluation_ids)
        counts = _label_counts(session, project, cycle)
        chunk_keys = [
            key
            for (key,) in session.execute(
                sa.select(col(ScoreChunk.result_key)).where(
                    col(ScoreChunk.cycle_id) == cycle_id, col(ScoreChunk.result_key).is_not(None)
                )
            )
        ]
        store = _store(project, settings)
        exploit: list[tuple[int, float | None, NDArray[np.float32] | None]] = []
        explore = 0
        if cycle.model_version is None:
            explore = batch_size
        else:
            if np.any(counts == 0):
                explore = min(int(np.ceil(config.selection.explore_share * batch_size)), batch_size)
            if chunk_keys and batch_size > explore:
                merged = merge_candidates(
                    [
                        candidates_from_table(pq.read_table(io.BytesIO(store.get(k))))
                        for k in chunk_keys
                    ],
                    k_prime=batch_size * config.selection.candidate_multiplier(),
                )
                live = _still_unlabeled(session, merged.item_ids.tolist())
                merged = merged.take(np.flatnonzero(np.isin(merged.item_ids, list(live))))
                if len(merged):
                    chosen = select_stage(
                        candidates=merged,
                        counts=counts,
                        config=config.selection,
                        batch_size=batch_size - explore,
                    )
                    position = {int(i): p for p, i in enumerate(merged.item_ids)}
                    exploit = [
                        (
                            int(i),
                            float(merged.scores[position[int(i)]]),
                            merged.probs[position[int(i)]],
                        )
                        for i in chosen
                    ]
        picked = {item_id for item_id, _, _ in exploit}
        explored: list[int] = []
        if explore:
            pool_ids = [
                item_id for item_id in _unlabeled_ids(session, project) if item_id not in picked
            ]
            if len(pool_ids) > COLD_START_SAMPLE:
                # k-means over a seeded sample: the whole pool would cost minutes per cycle and
                # a 20,000-item sample covers its clusters as well for batch-sized k.
                sample = np.random.default_rng(cycle_id).choice(
                    len(pool_ids), size=COLD_START_SAMPLE, replace=False
                )
                pool_ids = [pool_ids[int(i)] for i in np.sort(sample)]
            if pool_ids:
                features = load_items(session, project, pool_ids, settings).reshape(
                    len(pool_ids), -1
                )
                picks = cold_start(
                    features,
                    min(explore, len(pool_ids)),
                    method=config.selection.cold_start,
                    seed=cycle_id,
                )
                explored = [pool_ids[int(p)] for p in picks]
        rows = (
            [
                CycleSelection(cycle_id=cycle_id, item_id=item_id, rank=rank, evaluation=True)
                for rank, item_id in enumerate(evaluation_ids)
            ]
            + [
                CycleSelection(
                    cycle_id=cycle_id,
                    item_id=item_id,
                    rank=len(evaluation_ids) + rank,
                    score=score_value,
                    predicted_label=project.labels[int(np.argmax(probs))]
                    if probs is not None
                    else None,
                    probability=float(np.max(probs)) if probs is not None else None,
                    model_version=cycle.model_version,
                )
                for rank, (item_id, score_value, probs) in enumerate(exploit)
            ]
            + [
                CycleSelection(
                    cycle_id=cycle_id,
                    item_id=item_id,
                    rank=len(evaluation_ids) + len(exploit) + i,
                    cold_start=True,
                )
                for i, item_id in enumerate(explored)
            ]
        )
        session.add_all(rows)
        transition_items(
            session,
            [row.item_id for row in rows],
            ItemStatus.SELECTED,
            expected=ItemStatus.UNLABELED,
        )
        cycle.selected_count = len(rows)
        cycle.cold_start_picks = len(explored)
        session.add(cycle)
        session.flush()
        transition_cycle(session, cycle_id, CycleState.HANDING_OFF)
        return True


def _unlabeled_ids(session: Session, project: Project) -> list[int]:
    return sorted(
        item_id
        for (item_id,) in session.execute(
            sa.select(col(Item.id)).where(
                col(Item.project_id) == project.id,
                col(Item.status) == ItemStatus.UNLABELED,
                col(Item.eval_set).is_(False),
            )
        )
    )


def _still_unlabeled(session: Session, item_ids: list[int]) -> set[int]:
    found: set[int] = set()
    for start in range(0, len(item_ids), 5000):
        found.update(
            item_id
            for (item_id,) in session.execute(
                sa.select(col(Item.id)).where(
                    col(Item.id).in_(item_ids[start : start + 5000]),
                    col(Item.status) == ItemStatus.UNLABELED,
                )
            )
        )
    return found


# -------------------------------------------------------------------------- hand-off/ingest


def _simulated_truth(project: Project, settings: Settings) -> dict[str, str]:
    labeler = project.labeler
    key = str(labeler.get("truth_key", ""))
    table = pq.read_table(io.BytesIO(_store(project, settings).get(key)))
    return dict(zip(table["item_id"].to_pylist(), table["label"].to_pylist(), strict=True))


def set_simulated_labeler(
    session: Session, project_name: str, truth: pa.Table, settings: Settings, *, annotator: str
) -> Project:
    """Make a simulated annotator the project's labeler: it answers hand-offs from `truth`
    (columns item_id, label), which is stored write-once in the project's store."""
    project = get_project(session, project_name, for_update=True)
    for column in ("item_id", "label"):
        if column not in truth.column_names:
            raise InvalidInput("the truth table needs columns item_id, label")
    outside = sorted(set(truth["label"].to_pylist()) - set(project.labels))
    if outside:
        raise InvalidInput(f"truth labels {outside[:10]} are not in the label set")
    body = _parquet_bytes(
        truth.select(["item_id", "label"]).cast(
            pa.schema([pa.field("item_id", pa.string()), pa.field("label", pa.string())])
        )
    )
    key = safe_key(project.name, "labeler", f"truth-{sha256_hex(body)}.parquet")
    _store(project, settings).put_if_absent(key, body)
    project.labeler = {"kind": "simulated", "truth_key": key, "annotator": annotator}
    session.add(project)
    session.flush()
    return project


def hand_off(engine: sa.Engine, cycle_id: int, settings: Settings) -> list[int]:
    """Give the cycle's batch to the project's labeler and finish the cycle. Returns the inbox
    event ids the labeler produced (to ingest).

    `label_studio`: tasks are created in Label Studio (services.labelstudio); items become
    queued as Label Studio confirms them. `simulated`: items go selected -> queued and the
    annotator's answers are stored as inbox events, exactly as a labeling tool's webhooks would
    be. `none`: the items stay selected for whoever fetches the batch.
    """
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        if cycle is None:
            raise NotFound(f"no cycle with id {cycle_id}")
        if _cancel_if_requested(session, cycle) or cycle.state != CycleState.HANDING_OFF:
            return []
        project = session.get(Project, cycle.project_id)
        assert project is not None
        logs.bind(project=project.name, cycle_id=cycle.id)
        kind = project.labeler.get("kind")
    if kind == labelstudio.KIND:
        try:
            report = labelstudio.hand_off(engine, cycle_id, settings)
        except InvalidInput as error:
            # Label Studio refused (a missing token, a deleted project): retrying cannot help.
            # Tasks never sent are dropped; the selection goes back to the pool.
            with session_scope(engine) as session:
                labelstudio.drop_unsent_tasks(session, cycle_id)
                fail_cycle(session, cycle_id, f"hand-off to Label Studio failed: {error}")
            return []
        log.info("cycle %s handed off to Label Studio: %s", cycle_id, report)
        with session_scope(engine) as session:
            cycle = session.get(Cycle, cycle_id)
            assert cycle is not None
            if cycle.state == CycleState.HANDING_OFF:
                transition_cycle(session, cycle_id, CycleState.DONE)
        return []
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        assert cycle is not None
        if cycle.state != CycleState.HANDING_OFF:
            return []
        project = session.get(Project, cycle.project_id)
        assert project is not None
        logs.bind(project=project.name, cycle_id=cycle.id)
        rows = session.execute(
            sa.select(col(Item.id), col(Item.external_id))
            .join(CycleSelection, col(CycleSelection.item_id) == col(Item.id))
            .where(
                col(CycleSelection.cycle_id) == cycle_id,
                col(Item.status) == ItemStatus.SELECTED,
            )
            .order_by(col(CycleSelection.rank))
        ).all()
        event_ids: list[int] = []
        if kind == "simulated" and rows:
            truth = _simulated_truth(project, settings)
            transition_items(
                session,
                [item_id for item_id, _ in rows],
                ItemStatus.QUEUED,
                expected=ItemStatus.SELECTED,
            )
            now = utcnow()
            annotator = str(project.labeler.get("annotator", "simulated"))
            events = [
                InboxEvent(
                    source=SIMULATED_SOURCE,
                    event_key=f"cycle-{cycle_id}-item-{item_id}",
                    action="ANNOTATION_CREATED",
                    project_id=project.id,
                    payload={
                        "item_id": item_id,
                        "label": truth.get(external_id),
                        "annotator": annotator,
                        "at": now.isoformat(),
                    },
                )
                for item_id, external_id in rows
            ]
            session.add_all(events)
            session.flush()
            event_ids = [event.id or 0 for event in events]
        transition_cycle(session, cycle_id, CycleState.DONE)
        return event_ids


@dataclass(frozen=True)
class IngestReport:
    stored: int
    duplicates: int
    rejected: int


def ingest_events(engine: sa.Engine, event_ids: Sequence[int]) -> IngestReport:
    """Turn stored labeler events into annotations. Label Studio events are applied in batches
    together with any others waiting (services.labelstudio.ingest_pending); the rest each in
    its own transaction. A bad event records its error and the rest go on; an event already
    processed is skipped."""
    stored = duplicates = rejected = 0
    with session_scope(engine) as session:
        sources = dict(
            session.execute(
                sa.select(col(InboxEvent.id), col(InboxEvent.source)).where(
                    col(InboxEvent.id).in_(list(event_ids))
                )
            ).all()
        )
    if labelstudio.SOURCE in sources.values():
        totals = labelstudio.ingest_pending(engine)
        stored, duplicates, rejected = totals.stored, totals.duplicates, totals.rejected
    for event_id in event_ids:
        if sources.get(event_id) == labelstudio.SOURCE:
            continue
        with session_scope(engine) as session:
            event = session.get(InboxEvent, event_id, with_for_update=True)
            if event is None or event.processed_at is not None:
                duplicates += 1
                continue
            payload = event.payload
            try:
                with session.begin_nested():
                    label = payload.get("label")
                    row = record_annotation(
                        session,
                        AnnotationInput(
                            item_id=int(payload["item_id"]),
                            label=None if label is None else str(label),
                            source=event.source,
                            external_id=event.event_key,
                            updated_at=datetime.fromisoformat(str(payload["at"])),
                            annotator=str(payload.get("annotator", event.source)),
                            cancelled=label is None,
                        ),
                    )
                stored += row is not None
                duplicates += row is None
            except (InvalidInput, Conflict, KeyError, ValueError) as error:
                event.error = str(error)[:4000]
                rejected += 1
            event.processed_at = utcnow()
            session.add(event)
    return IngestReport(stored=stored, duplicates=duplicates, rejected=rejected)


def pending_events(session: Session, *, limit: int = 10_000) -> list[int]:
    """Inbox events not processed yet, oldest first (what a lost ingest message left behind)."""
    return list(
        session.exec(
            select(InboxEvent.id)
            .where(col(InboxEvent.processed_at).is_(None))
            .order_by(col(InboxEvent.id))
            .limit(limit)
        ).all()  # type: ignore[arg-type]
    )


# -------------------------------------------------------------------------------- scheduling


def labels_since_model(session: Session, project: Project) -> int:
    """Human labels stored since the dataset version the newest model was trained on was
    committed (all human labels when there is no model yet). The newest, not the current: a
    model the gate rejected was trained on those labels, and retraining on them again would
    loop."""
    model = session.exec(
        select(ModelVersion)
        .where(ModelVersion.project_id == project.id)
        .order_by(col(ModelVersion.version).desc())
    ).first()
    statement = (
        select(func.count())
        .select_from(Annotation)
        .where(
            Annotation.project_id == project.id,
            Annotation.source != "seed",
            col(Annotation.cancelled).is_(False),
        )
    )
    if model is not None:
        version = get_version(session, project, model.dataset_version)
        if version.committed_at is not None:
            statement = statement.where(col(Annotation.created_at) > version.committed_at)
    return int(session.exec(statement).one())


def _cron_due(project: Project, last_start: datetime | None, now: datetime) -> bool:
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


def maybe_start_cycle(
    engine: sa.Engine, project_name: str, settings: Settings, *, now: datetime | None = None
) -> Cycle | None:
    """Beat's trigger for one project: start a cycle when none is active, the project is not
    paused, the budget is not spent, and either it has never run, or at least
    `retrain_min_new_labels` labels arrived since the current model's dataset version, or its
    cron fired since the last cycle. New labels are first committed as a dataset version."""
    now = now or utcnow()
    with session_scope(engine) as session:
        project = get_project(session, project_name)
        if project.paused or active_cycle(session, project) is not None:
            return None
        if project.label_budget is not None and (
            human_labels_spent(session, project) >= project.label_budget
        ):
            return None
        last_start = session.exec(
            select(func.max(Cycle.created_at)).where(Cycle.project_id == project.id)
        ).one()
        new_labels = labels_since_model(session, project)
        never_ran = last_start is None
        if not (
            never_ran
            or new_labels >= project.retrain_min_new_labels
            or _cron_due(project, last_start, now)
        ):
            return None
        trigger = (
            "first cycle"
            if never_ran
            else f"{new_labels} new labels"
            if new_labels >= project.retrain_min_new_labels
            else f"cron {project.retrain_cron}"
        )
        if new_labels or never_ran:
            labeled = session.exec(
                select(func.count())
                .select_from(Item)
                .where(Item.project_id == project.id, col(Item.label).is_not(None))
            ).one()
            if labeled:
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


# --------------------------------------------------------------------------------- recovery


@dataclass
class Recovery:
    """What recover_stalled decided: chunks and trainings to enqueue again, cycles failed,
    selections and hand-offs to resume, inbox events to ingest."""

    chunk_ids: list[int] = field(default_factory=list)
    train_cycle_ids: list[int] = field(default_factory=list)
    select_cycle_ids: list[int] = field(default_factory=list)
    hand_off_cycle_ids: list[int] = field(default_factory=list)
    failed_cycle_ids: list[int] = field(default_factory=list)
    event_ids: list[int] = field(default_factory=list)


def recover_stalled(
    engine: sa.Engine,
    settings: Settings,
    *,
    now: datetime | None = None,
    stale_s: float | None = None,
) -> Recovery:
    """Find work whose worker died or whose message was lost, and say what to enqueue again.

    Running chunks and trainings with an expired lease are re-enqueued (their next claim counts
    an attempt; past the limit the cycle fails with the reason). Pending chunks, pending or
    selecting / handing-off cycles untouched for `stale_s` (default: one lease) are re-enqueued
    too, since a broker restart can lose their message; their claims make duplicates harmless.
    Cycles past their deadline fail.
    """
    now = now or utcnow()
    stale_before = now - timedelta(seconds=stale_s if stale_s is not None else settings.lease_s)
    recovery = Recovery()
    with session_scope(engine) as session:
        for cycle in session.exec(
            select(Cycle).where(col(Cycle.state).not_in([str(s) for s in FINAL_CYCLE_STATES]))
        ).all():
            cycle_id = cycle.id or 0
            if cycle.deadline_at is not None and cycle.deadline_at < now:
                fail_cycle(session, cycle_id, "deadline passed: the cycle ran too long")
                recovery.failed_cycle_ids.append(cycle_id)
                continue
            state = CycleState(cycle.state)
            if (
                state == CycleState.TRAINING
                and (cycle.lease_expires_at is not None and cycle.lease_expires_at < now)
            ) or (state == CycleState.PENDING and cycle.updated_at < stale_before):
                recovery.train_cycle_ids.append(cycle_id)
            elif state == CycleState.SELECTING and cycle.updated_at < stale_before:
                recovery.select_cycle_ids.append(cycle_id)
            elif state == CycleState.HANDING_OFF and cycle.updated_at < stale_before:
                recovery.hand_off_cycle_ids.append(cycle_id)
            elif state == CycleState.SCORING:
                for chunk in session.exec(
                    select(ScoreChunk).where(
                        ScoreChunk.cycle_id == cycle_id,
                        col(ScoreChunk.state).in_([ChunkState.PENDING, ChunkState.RUNNING]),
                    )
                ).all():
                    expired = (
                        chunk.state == ChunkState.RUNNING
                        and chunk.lease_expires_at is not None
                        and chunk.lease_expires_at < now
                    )
                    lost = chunk.state == ChunkState.PENDING and chunk.updated_at < stale_before
                    if expired and chunk.attempts >= settings.max_chunk_attempts:
                        _fail_chunk(
                            session,
                            chunk,
                            f"gave up after {chunk.attempts} attempts (lease expired each time)",
                        )
                        recovery.failed_cycle_ids.append(cycle_id)
                        break
                    if expired or lost:
                        recovery.chunk_ids.append(chunk.id or 0)
        recovery.event_ids = pending_events(session)
    return recovery


def cycle_summary(session: Session, cycle: Cycle) -> dict[str, Any]:
    """A JSON-friendly view of a cycle for the CLI."""
    summary: dict[str, Any] = json.loads(
        json.dumps(
            {
                "id": cycle.id,
                "state": cycle.state,
                "trigger": cycle.trigger,
                "dataset_version": cycle.dataset_version,
                "model_version": cycle.model_version,
                "chunks": f"{cycle.chunks_done}/{cycle.chunks_total}"
                if cycle.chunks_total is not None
                else None,
                "selected": cycle.selected_count,
                "cold_start_picks": cycle.cold_start_picks,
                "failure_reason": cycle.failure_reason,
                "cancel_requested": cycle.cancel_requested,
                "timeline": cycle.timeline,
            },
            default=str,
        )
    )
    return summary
