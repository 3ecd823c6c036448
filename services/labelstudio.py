"""The loop's side of the Label Studio round trip: connect a project, hand a cycle's batch off
as tasks (hardest first, each with the model's prediction), take answers back (webhook events
and a full reconcile), and send confidently contradicted labels to review.

Label Studio is reached only through `labeling.gateway`. The database is the source of truth:
a `LabelTask` row is written (pending) before Label Studio is asked to create the task, and
confirmed (open, with Label Studio's id) after; anything that died in between is reconciled by
item id before the next import, so no item ever gets a second labeling task.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
import pyarrow.parquet as pq
import sqlalchemy as sa
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from labeling.gateway import LabelStudioGateway, RemoteTask
from labeling.payloads import (
    ParsedAnnotation,
    TaskSpec,
    feature_row,
    label_config,
    parse_annotation,
    prediction_payload,
    task_payload,
)
from services.config import Settings, secret_from_environment
from services.datasets.pool import load_shard
from services.datasets.store import StoreUrl, open_store, s3_client
from services.db import session_scope
from services.errors import FocalloopError, InvalidInput, NotFound
from services.models import (
    Annotation,
    Cycle,
    CycleSelection,
    CycleState,
    InboxEvent,
    Item,
    ItemStatus,
    LabelTask,
    LabelTaskState,
    Project,
    ScoreChunk,
    utcnow,
)
from services.projects import get_project
from services.state import (
    AnnotationInput,
    move_items_still_in,
    record_annotations,
    transition_item,
    transition_items,
    withdraw_annotation,
    withdraw_annotations,
)

log = logging.getLogger(__name__)

SOURCE = "label_studio"
KIND = "label_studio"
# The events we register for; anything else a misconfigured webhook sends is acknowledged and
# ignored (Label Studio disables a webhook that keeps failing).
CREATED_OR_UPDATED = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"})
DELETED = "ANNOTATIONS_DELETED"
SYNC_ACTION = "SYNC"  # an annotation found by sync_annotations rather than delivered by webhook
MEDIA_MODES = ("auto", "api", "presigned")
DEFAULT_REVIEW_THRESHOLD = 0.05
DEFAULT_REVIEWS_PER_CYCLE = 20


# --------------------------------------------------------------------------------- the link


@dataclass(frozen=True)
class LabelStudioLink:
    """A project's connection, as stored in `Project.labeler` (kind label_studio).

    token_env names the environment variable holding the API token (the token itself is never
    stored). media: `api` (our API serves the image, signed links), `presigned` (S3 presigned
    links to the source object), `auto` (presigned for s3:// sources, api otherwise).
    """

    url: str
    token_env: str
    project_id: int
    webhook_id: int
    view_id: int
    media: str = "auto"
    review_threshold: float = DEFAULT_REVIEW_THRESHOLD
    reviews_per_cycle: int = DEFAULT_REVIEWS_PER_CYCLE
    last_sync_at: str | None = None

    @classmethod
    def of(cls, project: Project) -> LabelStudioLink:
        labeler = project.labeler
        if labeler.get("kind") != KIND:
            raise InvalidInput(
                f"project {project.name!r} is not connected to Label Studio "
                f"(labeler kind {labeler.get('kind')!r}); run `focalloop labelstudio connect`"
            )
        return cls(
            url=str(labeler["url"]),
            token_env=str(labeler["token_env"]),
            project_id=int(labeler["project_id"]),
            webhook_id=int(labeler["webhook_id"]),
            view_id=int(labeler["view_id"]),
            media=str(labeler.get("media", "auto")),
            review_threshold=float(labeler.get("review_threshold", DEFAULT_REVIEW_THRESHOLD)),
            reviews_per_cycle=int(labeler.get("reviews_per_cycle", DEFAULT_REVIEWS_PER_CYCLE)),
            last_sync_at=labeler.get("last_sync_at"),
        )

    def as_labeler(self) -> dict[str, Any]:
        return {"kind": KIND, **{k: v for k, v in vars(self).items() if v is not None}}


def gateway(link: LabelStudioLink, settings: Settings) -> LabelStudioGateway:
    try:
        token = secret_from_environment(link.token_env)
    except KeyError as error:
        raise InvalidInput(f"the Label Studio token: {error.args[0]}") from None
    return LabelStudioGateway(
        link.url, token.get_secret_value(), timeout_s=settings.label_studio_timeout_s
    )


def webhook_url(settings: Settings, project_name: str) -> str:
    return f"{settings.api_url.rstrip('/')}/api/v1/webhooks/label-studio?project={project_name}"


def _webhook_secret(settings: Settings) -> str:
    if settings.webhook_secret is None or not settings.webhook_secret.get_secret_value():
        raise InvalidInput(
            "FOCALLOOP_WEBHOOK_SECRET is not set: Label Studio's webhooks could not be checked"
        )
    return settings.webhook_secret.get_secret_value()


def connect(
    session: Session,
    project_name: str,
    *,
    url: str,
    token_env: str,
    settings: Settings,
    media: str = "auto",
    review_threshold: float = DEFAULT_REVIEW_THRESHOLD,
    reviews_per_cycle: int = DEFAULT_REVIEWS_PER_CYCLE,
) -> LabelStudioLink:
    """Make Label Studio the project's labeler: a Label Studio project with a labeling
    interface generated from our label set (Label Studio validates it), our webhook with the
    secret header, and a saved hardest-first view.

    Connecting again (same URL) reuses the Label Studio project, refreshes its label config (the
    label set may have grown) and webhook, so it is safe to repeat.
    """
    if media not in MEDIA_MODES:
        raise InvalidInput(f"media must be one of {MEDIA_MODES}, got {media!r}")
    if not 0.0 < review_threshold < 1.0:
        raise InvalidInput(f"review threshold must be in (0, 1), got {review_threshold}")
    if reviews_per_cycle < 0:
        raise InvalidInput(f"reviews per cycle must be >= 0, got {reviews_per_cycle}")
    secret = _webhook_secret(settings)
    project = get_project(session, project_name, for_update=True)
    config = label_config(project.labels, project.modality)
    provisional = LabelStudioLink(
        url=url, token_env=token_env, project_id=0, webhook_id=0, view_id=0, media=media
    )
    remote = gateway(provisional, settings)
    remote.whoami()
    previous = project.labeler if project.labeler.get("kind") == KIND else {}
    ls_project: int | None = None
    if previous.get("url", "").rstrip("/") == url.rstrip("/"):
        candidate = int(previous["project_id"])
        if remote.project_exists(candidate):
            ls_project = candidate
            remote.set_label_config(candidate, config)
    if ls_project is None:
        ls_project = remote.create_project(
            title=f"focalloop {project.name}",
            label_config=config,
            description=(
                f"Items the focalloop project {project.name!r} finds hardest. Tasks are "
                "created by focalloop; answer with one label per task."
            ),
        )
    link = LabelStudioLink(
        url=url.rstrip("/"),
        token_env=token_env,
        project_id=ls_project,
        webhook_id=remote.ensure_webhook(
            ls_project, url=webhook_url(settings, project.name), secret=secret
        ),
        view_id=remote.ensure_hardest_first_view(ls_project),
        media=media,
        review_threshold=review_threshold,
        reviews_per_cycle=reviews_per_cycle,
    )
    project.labeler = link.as_labeler()
    project.updated_at = utcnow()
    session.add(project)
    session.flush()
    return link


def model_version_name(project: Project, model_version: int) -> str:
    return f"{project.name}-m{model_version}"


# ------------------------------------------------------------------------------------ media


def _media_key(settings: Settings) -> bytes:
    # A key derived for this one purpose, so a media link can never stand in for the webhook
    # secret itself.
    return hmac.new(_webhook_secret(settings).encode(), b"focalloop media links", "sha256").digest()


def media_signature(settings: Settings, project_name: str, item_id: int, expires: int) -> str:
    message = f"{project_name}\n{item_id}\n{expires}".encode()
    return hmac.new(_media_key(settings), message, "sha256").hexdigest()


def check_media_signature(
    settings: Settings, project_name: str, item_id: int, expires: int, signature: str
) -> None:
    """InvalidInput unless the link is ours and not expired (constant-time compare)."""
    expected = media_signature(settings, project_name, item_id, expires)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise InvalidInput("bad media link signature")
    if expires < time.time():
        raise InvalidInput("media link expired")


def media_url(project: Project, item: Item, link: LabelStudioLink, settings: Settings) -> str:
    """The URL a task shows for an image item: an S3 presigned GET of the source object, or a
    signed link to our API's media endpoint."""
    expires = int(time.time()) + settings.media_url_ttl_s
    use_presigned = link.media == "presigned" or (
        link.media == "auto" and item.uri.startswith("s3://")
    )
    if use_presigned:
        if not item.uri.startswith("s3://"):
            raise InvalidInput(f"item {item.external_id!r} is not in S3; presigned links need S3")
        source = StoreUrl.parse(item.uri)
        return s3_client(settings).generate_presigned_url(
            "get_object",
            Params={"Bucket": source.bucket, "Key": source.root},
            ExpiresIn=settings.media_url_ttl_s,
        )
    query = urlencode(
        {
            "expires": expires,
            "signature": media_signature(settings, project.name, item.id or 0, expires),
        }
    )
    return f"{settings.api_url.rstrip('/')}/api/v1/media/{quote(project.name)}/{item.id}?{query}"


# --------------------------------------------------------------------------------- hand-off


@dataclass
class PushReport:
    created: int = 0
    adopted: int = 0  # found already in Label Studio (an earlier attempt's import went through)
    predictions_refreshed: int = 0
    in_flight: int = 0  # 1 when another pusher's batch was still unconfirmed (left to it)


def pending_tasks(
    session: Session, project_id: int, *, limit: int | None = None, attempted: bool | None = None
) -> list[LabelTask]:
    """The project's tasks not confirmed by Label Studio yet, oldest first; `attempted` True
    keeps only those already sent once (their fate is unknown), False only those never sent."""
    statement = select(LabelTask).where(
        LabelTask.project_id == project_id, LabelTask.state == LabelTaskState.PENDING
    )
    if attempted is True:
        statement = statement.where(col(LabelTask.attempted_at).is_not(None))
    elif attempted is False:
        statement = statement.where(col(LabelTask.attempted_at).is_(None))
    statement = statement.order_by(col(LabelTask.id))
    if limit is not None:
        statement = statement.limit(limit)
    return list(session.exec(statement).all())


def _feature_rows(
    project: Project, items: Sequence[Item], settings: Settings
) -> dict[int, dict[str, str]]:
    store = open_store(project.store_url, settings)
    rows: dict[int, dict[str, str]] = {}
    by_shard: dict[str, list[Item]] = {}
    for item in items:
        if item.shard_key is not None:
            by_shard.setdefault(item.shard_key, []).append(item)
    for key, members in by_shard.items():
        shard = load_shard(store, key)
        for item in members:
            rows[item.id or 0] = feature_row(shard.data[int(item.shard_row or 0)].tolist())
    return rows


def _payloads(
    session: Session, project: Project, rows: Sequence[LabelTask], settings: Settings
) -> list[dict[str, Any]]:
    link = LabelStudioLink.of(project)
    items = {
        item.id: item
        for item in session.exec(
            select(Item).where(col(Item.id).in_([row.item_id for row in rows]))
        ).all()
    }
    features = (
        _feature_rows(project, list(items.values()), settings)
        if project.modality == "features"
        else {}
    )
    payloads = []
    for row in rows:
        item = items[row.item_id]
        media: str | Mapping[str, str] = (
            features[row.item_id]
            if project.modality == "features"
            else media_url(project, item, link, settings)
        )
        prediction = (
            (row.prediction_label, float(row.prediction_score))
            if row.prediction_label is not None and row.prediction_score is not None
            else None
        )
        payloads.append(
            task_payload(
                TaskSpec(
                    item_id=row.item_id,
                    external_id=item.external_id,
                    kind="review" if row.kind == "review" else "label",
                    media=media,
                    note=row.note,
                    prediction=prediction,
                    model_version=row.model_version,
                ),
                project.modality,
            )
        )
    return payloads


def _confirm(session: Session, row_ids: Sequence[int], task_ids: Sequence[int]) -> None:
    """Record Label Studio's ids and move the items on: label -> queued (from selected),
    review -> in_review (from labeled). An item that moved meanwhile (an answer arrived first)
    keeps its status. A fixed number of statements per batch."""
    now = utcnow()
    session.execute(
        sa.update(LabelTask),
        [
            {
                "id": row_id,
                "external_task_id": task_id,
                "state": LabelTaskState.OPEN,
                "updated_at": now,
            }
            for row_id, task_id in zip(row_ids, task_ids, strict=True)
        ],
    )
    kinds = dict(
        session.execute(
            sa.select(col(LabelTask.item_id), col(LabelTask.kind)).where(
                col(LabelTask.id).in_(list(row_ids))
            )
        ).all()
    )
    label_items = [item_id for item_id, kind in kinds.items() if kind == "label"]
    review_items = [item_id for item_id, kind in kinds.items() if kind == "review"]
    move_items_still_in(session, label_items, ItemStatus.QUEUED, expected=ItemStatus.SELECTED)
    move_items_still_in(session, review_items, ItemStatus.IN_REVIEW, expected=ItemStatus.LABELED)


def _in_flight_cutoff(settings: Settings) -> datetime:
    """Rows sent after this may still be confirmed by the pusher that sent them (it waits at
    most the request timeout); only rows sent before it are another pusher's to reconcile."""
    return utcnow() - timedelta(seconds=settings.label_studio_timeout_s + 30)


def _reconcile(
    engine: sa.Engine,
    project_id: int,
    remote: LabelStudioGateway,
    link: LabelStudioLink,
    settings: Settings,
) -> int:
    """Pending rows that were sent once and never confirmed (their pusher died, or its request
    timed out) may exist in Label Studio: adopt every task found for their (item, kind). Returns
    how many were adopted."""
    cutoff = _in_flight_cutoff(settings)
    with session_scope(engine) as session:
        uncertain = [
            row
            for row in pending_tasks(session, project_id, attempted=True)
            if row.attempted_at is not None and row.attempted_at < cutoff
        ]
        if not uncertain:
            return 0
        known = set(
            session.exec(
                select(LabelTask.external_task_id).where(
                    LabelTask.project_id == project_id,
                    col(LabelTask.external_task_id).is_not(None),
                )
            ).all()
        )
        wanted = {(row.item_id, row.kind): row for row in uncertain}
    found: dict[int, int] = {}
    for task in remote.list_tasks(link.project_id):
        key = (task.item_id or -1, task.kind)
        if key in wanted and task.task_id not in known:
            found.setdefault(wanted[key].id or 0, task.task_id)
    if found:
        with session_scope(engine) as session:
            _confirm(session, list(found), list(found.values()))
    return len(found)


def push_pending(engine: sa.Engine, project_name: str, settings: Settings) -> PushReport:
    """Create every pending task of the project in Label Studio, in batches, each batch
    confirmed in the database before the next is sent."""
    report = PushReport()
    with session_scope(engine) as session:
        project = get_project(session, project_name)
        link = LabelStudioLink.of(project)
        project_id = project.id or 0
    remote = gateway(link, settings)
    report.adopted = _reconcile(engine, project_id, remote, link, settings)
    batch = settings.label_studio_import_batch
    while True:
        with session_scope(engine) as session:
            # The project row lock makes concurrent pushers (a hand-off and `labelstudio push`)
            # take turns choosing and marking rows.
            project = get_project(session, project_name, for_update=True)
            rows = pending_tasks(session, project_id, limit=batch)
            if not rows:
                return report
            cutoff = _in_flight_cutoff(settings)
            if any(row.attempted_at and row.attempted_at >= cutoff for row in rows):
                # Another pusher sent these moments ago and will confirm them: leave them.
                report.in_flight += 1
                return report
            if any(row.attempted_at for row in rows):
                # Sent before and never confirmed: only a reconcile may decide (never re-import).
                continue_after_reconcile = True
            else:
                continue_after_reconcile = False
                payloads = _payloads(session, project, rows, settings)
                now = utcnow()
                for row in rows:
                    row.attempted_at = now
                    session.add(row)
            row_ids = [row.id or 0 for row in rows]
        if continue_after_reconcile:
            adopted = _reconcile(engine, project_id, remote, link, settings)
            report.adopted += adopted
            if adopted == 0:
                # Label Studio has none of them: the earlier import never arrived. Clear the
                # mark so they are sent.
                with session_scope(engine) as session:
                    session.execute(
                        sa.update(LabelTask)
                        .where(
                            col(LabelTask.id).in_(row_ids),
                            col(LabelTask.state) == LabelTaskState.PENDING,
                        )
                        .values(attempted_at=None)
                    )
            continue
        task_ids = remote.import_tasks(link.project_id, payloads)
        with session_scope(engine) as session:
            _confirm(session, row_ids, task_ids)
        report.created += len(task_ids)


def _cycle_scores(
    session: Session, project: Project, cycle_id: int, item_ids: set[int], settings: Settings
) -> dict[int, tuple[str, float]]:
    """The cycle's per-item predictions (label, probability) for `item_ids`, from the score
    chunks' Parquet files."""
    if not item_ids:
        return {}
    store = open_store(project.store_url, settings)
    found: dict[int, tuple[str, float]] = {}
    keys = session.exec(
        select(ScoreChunk.scores_key).where(
            ScoreChunk.cycle_id == cycle_id, col(ScoreChunk.scores_key).is_not(None)
        )
    ).all()
    wanted = np.fromiter(item_ids, dtype=np.int64)
    for key in keys:
        assert key is not None
        table = pq.read_table(
            io.BytesIO(store.get(key)), columns=["item_id", "predicted_label", "max_prob"]
        )
        ids = table["item_id"].to_numpy()
        for row in np.flatnonzero(np.isin(ids, wanted)):
            found[int(ids[row])] = (
                str(table["predicted_label"][int(row)].as_py()),
                float(table["max_prob"][int(row)].as_py()),
            )
    return found


def _refresh_predictions(
    engine: sa.Engine, cycle_id: int, settings: Settings, remote: LabelStudioGateway
) -> int:
    """Tasks still waiting for a label get this cycle's prediction in place of an older
    model's, so the hardest-first order always reflects the current model."""
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        assert cycle is not None
        project = session.get(Project, cycle.project_id)
        assert project is not None
        link = LabelStudioLink.of(project)
        if cycle.model_version is None:
            return 0
        version = model_version_name(project, cycle.model_version)
        stale = session.exec(
            select(LabelTask)
            .join(Item, col(Item.id) == col(LabelTask.item_id))
            .where(
                LabelTask.project_id == project.id,
                LabelTask.kind == "label",
                LabelTask.state == LabelTaskState.OPEN,
                col(Item.status) == ItemStatus.QUEUED,
                sa.or_(
                    col(LabelTask.model_version).is_(None),
                    col(LabelTask.model_version) != version,
                ),
            )
        ).all()
        scores = _cycle_scores(session, project, cycle_id, {row.item_id for row in stale}, settings)
        updates = [(row, scores[row.item_id]) for row in stale if row.item_id in scores]
        predictions = [
            (
                int(row.external_task_id or 0),
                prediction_payload(prediction, version, modality=project.modality),
            )
            for row, prediction in updates
        ]
        ls_project = link.project_id
    remote.replace_predictions(ls_project, predictions)
    if updates:
        now = utcnow()
        with session_scope(engine) as session:
            session.execute(
                sa.update(LabelTask),
                [
                    {
                        "id": row.id,
                        "model_version": version,
                        "prediction_label": label,
                        "prediction_score": probability,
                        "updated_at": now,
                    }
                    for row, (label, probability) in updates
                ],
            )
    return len(updates)


def plan_hand_off(session: Session, cycle: Cycle, project: Project) -> int:
    """Write the cycle's label tasks (pending) for its selected items; an item that already has
    a task in Label Studio (selected again after its label was withdrawn) reuses it and is
    queued at once. Returns how many new tasks were planned. Safe to repeat."""
    rows = session.execute(
        sa.select(
            col(Item.id),
            col(CycleSelection.predicted_label),
            col(CycleSelection.probability),
            col(CycleSelection.model_version),
        )
        .join(CycleSelection, col(CycleSelection.item_id) == col(Item.id))
        .where(
            col(CycleSelection.cycle_id) == cycle.id,
            col(Item.status) == ItemStatus.SELECTED,
        )
        .order_by(col(CycleSelection.rank))
    ).all()
    existing = {
        row.item_id: row
        for row in session.exec(
            select(LabelTask).where(
                LabelTask.project_id == project.id,
                LabelTask.kind == "label",
                col(LabelTask.item_id).in_([row[0] for row in rows]),
            )
        ).all()
    }
    planned = 0
    for item_id, predicted, probability, model_version in rows:
        task = existing.get(item_id)
        if task is not None:
            if task.state == LabelTaskState.OPEN:
                transition_item(session, item_id, ItemStatus.QUEUED)
            continue
        has_prediction = predicted is not None and probability is not None
        session.add(
            LabelTask(
                project_id=project.id or 0,
                item_id=item_id,
                kind="label",
                cycle_id=cycle.id,
                model_version=(
                    model_version_name(project, int(model_version))
                    if has_prediction and model_version is not None
                    else None
                ),
                prediction_label=predicted if has_prediction else None,
                prediction_score=float(probability) if has_prediction else None,
            )
        )
        planned += 1
    session.flush()
    return planned


def drop_unsent_tasks(session: Session, cycle_id: int) -> int:
    """Delete the cycle's label tasks that were never sent (its hand-off failed for good)."""
    result = session.execute(
        sa.delete(LabelTask)
        .where(
            col(LabelTask.cycle_id) == cycle_id,
            col(LabelTask.kind) == "label",
            col(LabelTask.state) == LabelTaskState.PENDING,
            col(LabelTask.attempted_at).is_(None),
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def hand_off(engine: sa.Engine, cycle_id: int, settings: Settings) -> PushReport:
    """The cycle's last stage for a Label Studio project: plan, push, refresh the open tasks'
    predictions, bump Label Studio's model version, finish the cycle. Every step can be
    repeated after a crash or a redelivered message without creating a task twice."""
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        if cycle is None:
            raise NotFound(f"no cycle with id {cycle_id}")
        if cycle.state != CycleState.HANDING_OFF:
            return PushReport()
        project = session.get(Project, cycle.project_id)
        assert project is not None
        plan_hand_off(session, cycle, project)
        project_name = project.name
        link = LabelStudioLink.of(project)
        model_version = (
            model_version_name(project, cycle.model_version)
            if cycle.model_version is not None
            else None
        )
    report = push_pending(engine, project_name, settings)
    remote = gateway(link, settings)
    report.predictions_refreshed = _refresh_predictions(engine, cycle_id, settings, remote)
    if model_version is not None:
        remote.set_model_version(link.project_id, model_version)
    return report


# ----------------------------------------------------------------------------------- review


@dataclass(frozen=True)
class ReviewCandidate:
    item_id: int
    given: int  # class index of the current label
    given_probability: float  # cross-fitted probability of the current label
    suggested: int
    suggested_probability: float


def review_candidates(
    inputs: NDArray[np.float32],
    labels: NDArray[np.int64],
    item_ids: NDArray[np.int64],
    *,
    n_classes: int,
    threshold: float,
    limit: int,
    seed: int,
) -> list[ReviewCandidate]:
    """Labeled items whose label a cross-fitted model confidently contradicts, most
    contradicted first.

    inputs [n, ...] (the items as the network sees them, flattened here), labels [n] class
    indices. Each item's probability of its given label comes from a standardized logistic
    regression fitted on the other folds (5-fold, stratified), so no label can vouch for
    itself. The trained network's own embeddings are not used: it was fitted on these very
    labels and has learned the mistakes (measured on digits with 3 flipped labels: embeddings
    found 1 of 3, the inputs 3 of 3). Classes with fewer than 2 labeled items take no part.
    """
    if limit <= 0 or len(labels) == 0:
        return []
    counts = np.bincount(labels, minlength=n_classes)
    usable = counts[labels] >= 2
    if len(np.unique(labels[usable])) < 2:
        return []
    x = inputs.reshape(len(inputs), -1)[usable]
    y, ids = labels[usable], item_ids[usable]
    folds = int(min(5, counts[counts >= 2].min()))
    probs = cross_val_predict(
        make_pipeline(StandardScaler(), LogisticRegression(C=10.0, max_iter=2000)),
        x,
        y,
        cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
        method="predict_proba",
    )
    present = np.unique(y)  # predict_proba's columns are these classes, in this order
    column = {int(cls): j for j, cls in enumerate(present)}
    given_p = probs[np.arange(len(y)), [column[int(c)] for c in y]]
    order = np.argsort(given_p, kind="stable")
    picked: list[ReviewCandidate] = []
    for row in order:
        if given_p[row] >= threshold or len(picked) >= limit:
            break
        suggested_column = int(probs[row].argmax())
        picked.append(
            ReviewCandidate(
                item_id=int(ids[row]),
                given=int(y[row]),
                given_probability=float(given_p[row]),
                suggested=int(present[suggested_column]),
                suggested_probability=float(probs[row, suggested_column]),
            )
        )
    return picked


def plan_reviews(
    session: Session,
    project: Project,
    cycle_id: int,
    candidates: Iterable[ReviewCandidate],
    model_version: str,
) -> int:
    """Pending review tasks for the candidates. An item is reviewed at most once (a reviewer's
    answer is final; a model that still disagrees does not send it back again). Returns how
    many were planned."""
    candidates = list(candidates)
    if not candidates:
        return 0
    ids = [c.item_id for c in candidates]
    reviewed = set(
        session.exec(
            select(LabelTask.item_id).where(
                LabelTask.project_id == project.id,
                LabelTask.kind == "review",
                col(LabelTask.item_id).in_(ids),
            )
        ).all()
    )
    labeled = set(
        session.exec(
            select(Item.id).where(col(Item.id).in_(ids), col(Item.status) == ItemStatus.LABELED)
        ).all()
    )
    planned = 0
    for candidate in candidates:
        if candidate.item_id in reviewed or candidate.item_id not in labeled:
            continue
        given = project.labels[candidate.given]
        suggested = project.labels[candidate.suggested]
        session.add(
            LabelTask(
                project_id=project.id or 0,
                item_id=candidate.item_id,
                kind="review",
                cycle_id=cycle_id,
                model_version=model_version,
                prediction_label=suggested,
                prediction_score=candidate.given_probability,
                note=(
                    f"Review: labeled {given!r}; the model suggests {suggested!r} "
                    f"(p={candidate.suggested_probability:.2f}; p({given!r})="
                    f"{candidate.given_probability:.3f}). Choose the correct label."
                ),
            )
        )
        planned += 1
    session.flush()
    return planned


# ----------------------------------------------------------------------------------- ingest


def event_key(action: str, body: Mapping[str, Any]) -> str:
    """The inbox key of a webhook body: annotation id + updated time for created/updated (so a
    redelivery or a sync of the same revision is one event), the deleted ids for deletions."""
    if action == DELETED:
        ids = sorted(
            int(a["id"]) for a in body.get("annotations") or [] if isinstance(a.get("id"), int)
        )
        return f"deleted:{','.join(map(str, ids))}"[:400]
    annotations = body.get("annotation")
    if isinstance(annotations, Mapping):
        return f"{annotations.get('id')}@{annotations.get('updated_at')}"[:400]
    digest = hashlib.sha256(repr(annotations).encode()).hexdigest()
    return f"bulk:{digest}"


def webhook_project_id(connection: sa.Connection, project_name: str) -> int:
    """The project a webhook URL names; NotFound when there is none."""
    project_id = connection.execute(
        sa.select(col(Project.id)).where(col(Project.name) == project_name)
    ).scalar()
    if project_id is None:
        raise NotFound(f"no project named {project_name!r}")
    return int(project_id)


def store_webhook(
    connection: sa.Connection, project_id: int, body: Mapping[str, Any]
) -> tuple[int | None, str]:
    """Store a Label Studio webhook body in the inbox, in one statement (the webhook answers
    within Label Studio's patience, so no ORM session and, on an autocommit connection, no
    transaction round trips). Returns (event id, outcome) where outcome is stored | duplicate |
    ignored; event id is set only when stored. InvalidInput for a body that is not a Label
    Studio annotation event."""
    action = body.get("action")
    if not isinstance(action, str):
        raise InvalidInput("the webhook body has no 'action'")
    if action not in CREATED_OR_UPDATED and action != DELETED:
        return None, "ignored"
    if action == DELETED:
        if not isinstance(body.get("annotations"), list):
            raise InvalidInput(f"{action} without an 'annotations' list")
    elif not isinstance(body.get("annotation"), (Mapping, list)):
        raise InvalidInput(f"{action} without an 'annotation'")
    values = {
        "source": SOURCE,
        "event_key": event_key(action, body),
        "action": action,
        "project_id": project_id,
        "payload": dict(body),
        "received_at": utcnow(),
        "processed_at": None,
        "error": None,
    }
    insert = (
        postgresql_insert(InboxEvent)
        if connection.dialect.name == "postgresql"
        else sqlite_insert(InboxEvent)
    )
    # The unique (source, event_key) makes a redelivery insert nothing, without a savepoint.
    event_id = connection.execute(
        insert.values(**values)
        .on_conflict_do_nothing(index_elements=["source", "event_key"])
        .returning(col(InboxEvent.id))
    ).scalar()
    if event_id is None:
        return None, "duplicate"
    return int(event_id), "stored"


@dataclass
class EventOutcome:
    stored: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)


def apply_event(session: Session, event: InboxEvent) -> EventOutcome:
    """Apply one stored Label Studio event (see apply_events)."""
    return apply_events(session, [event])[event.id or 0]


def apply_events(session: Session, events: Sequence[InboxEvent]) -> dict[int, EventOutcome]:
    """Apply stored Label Studio events in a fixed number of statements. Bad annotations (not
    our task, no single choice, a label outside the label set) are reported in their event's
    outcome and flag their items; they never stop the others."""
    outcomes = {event.id or 0: EventOutcome() for event in events}
    parsed_by_event: list[tuple[int, ParsedAnnotation]] = []
    deletions: dict[int, list[tuple[int, str]]] = {}  # project -> [(event, annotation id)]
    for event in events:
        outcome = outcomes[event.id or 0]
        if event.project_id is None:
            outcome.errors.append("the event names no known project")
            continue
        body = event.payload
        if event.action == DELETED:
            for annotation in body.get("annotations") or []:
                if isinstance(annotation, Mapping) and isinstance(annotation.get("id"), int):
                    deletions.setdefault(event.project_id, []).append(
                        (event.id or 0, str(annotation["id"]))
                    )
            continue
        raw = body.get("annotation")
        task = body.get("task") if isinstance(body.get("task"), Mapping) else None
        for annotation in raw if isinstance(raw, list) else [raw]:
            if not isinstance(annotation, Mapping):
                outcome.errors.append("an annotation that is not an object")
                continue
            try:
                parsed_by_event.append((event.id or 0, parse_annotation(annotation, task)))
            except InvalidInput as error:
                outcome.errors.append(str(error))
    project_of = {event.id or 0: event.project_id for event in events}
    projects = {
        project.id: project
        for project in session.exec(
            select(Project).where(col(Project.id).in_({p for p in project_of.values() if p}))
        ).all()
    }
    tasks: dict[tuple[int, int], LabelTask] = {}
    task_ids = sorted({parsed.task_id for _, parsed in parsed_by_event})
    for start in range(0, len(task_ids), 5000):
        for task in session.exec(
            select(LabelTask).where(
                col(LabelTask.project_id).in_(list(projects)),
                col(LabelTask.external_task_id).in_(task_ids[start : start + 5000]),
            )
        ).all():
            tasks[(task.project_id, int(task.external_task_id or 0))] = task
    answers: list[AnnotationInput] = []
    answered: list[tuple[int, LabelTask]] = []
    flags: dict[int, str] = {}
    for event_id, parsed in parsed_by_event:
        outcome = outcomes[event_id]
        project_id = project_of[event_id]
        project = projects.get(project_id)
        task = tasks.get((project_id or 0, parsed.task_id))
        if project is None or task is None:
            outcome.errors.append(
                f"annotation {parsed.annotation_id}: task {parsed.task_id} is not a focalloop task"
            )
            continue
        problem = parsed.error
        if problem is None and parsed.label is not None and parsed.label not in project.labels:
            problem = (
                f"label {parsed.label!r} is not in the label set {project.labels}; "
                "it was not stored"
            )
        if problem is not None:
            reason = f"Label Studio annotation {parsed.annotation_id}: {problem}"
            flags[task.item_id] = reason[:1000]
            outcome.errors.append(reason)
            continue
        answers.append(
            AnnotationInput(
                item_id=task.item_id,
                label=parsed.label,
                source=SOURCE,
                external_id=str(parsed.annotation_id),
                updated_at=parsed.updated_at,
                annotator=parsed.annotator,
                cancelled=parsed.cancelled,
            )
        )
        answered.append((event_id, task))
    rows = record_annotations(session, answers)
    accepted: set[int] = set()
    reviews_answered: set[int] = set()
    for (event_id, task), row in zip(answered, rows, strict=True):
        if row is None:
            outcomes[event_id].duplicates += 1
            continue
        outcomes[event_id].stored += 1
        accepted.add(task.item_id)
        if task.kind == "review":
            reviews_answered.add(task.id or 0)
    now = utcnow()
    if flags:
        session.execute(
            sa.update(Item),
            [
                {"id": item_id, "label_issue": reason, "updated_at": now}
                for item_id, reason in flags.items()
            ],
        )
    if accepted:
        session.execute(
            sa.update(Item)
            .where(col(Item.id).in_(sorted(accepted)), col(Item.label_issue).is_not(None))
            .values(label_issue=None)
            .execution_options(synchronize_session=False)
        )
    if reviews_answered:
        session.execute(
            sa.update(LabelTask)
            .where(col(LabelTask.id).in_(sorted(reviews_answered)))
            .values(state=LabelTaskState.ANSWERED, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        # A skipped review keeps the label as it was: the item leaves review either way.
        still_in_review = session.exec(
            select(Item.id)
            .join(LabelTask, col(LabelTask.item_id) == col(Item.id))
            .where(
                col(LabelTask.id).in_(sorted(reviews_answered)),
                col(Item.status) == ItemStatus.IN_REVIEW,
            )
        ).all()
        if still_in_review:
            transition_items(
                session,
                [int(i or 0) for i in still_in_review],
                ItemStatus.LABELED,
                expected=ItemStatus.IN_REVIEW,
            )
    for project_id, pairs in deletions.items():
        withdrawn_before = {
            external_id
            for (external_id,) in session.execute(
                sa.select(col(Annotation.external_id)).where(
                    col(Annotation.project_id) == project_id,
                    col(Annotation.source) == SOURCE,
                    col(Annotation.external_id).in_([a for _, a in pairs]),
                    col(Annotation.withdrawn_at).is_(None),
                )
            )
        }
        withdraw_annotations(
            session,
            project_id=project_id,
            source=SOURCE,
            external_ids=[a for _, a in pairs],
        )
        for event_id, annotation_id in pairs:
            if annotation_id in withdrawn_before:
                outcomes[event_id].stored += 1
                withdrawn_before.discard(annotation_id)
            else:
                outcomes[event_id].duplicates += 1
    session.flush()
    return outcomes


@dataclass
class IngestTotals:
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    events: int = 0


INGEST_BATCH = 500
INGEST_MAX_BATCHES = 40  # per call, so one task cannot hold a worker forever under load


def _mark(event: InboxEvent, outcome: EventOutcome, totals: IngestTotals) -> None:
    totals.stored += outcome.stored
    totals.duplicates += outcome.duplicates
    totals.events += 1
    if outcome.errors:
        event.error = "; ".join(outcome.errors)[:4000]
        totals.rejected += 1
    event.processed_at = utcnow()


def ingest_pending(engine: sa.Engine, *, batch: int = INGEST_BATCH) -> IngestTotals:
    """Apply every unprocessed Label Studio event, oldest first, in batches of `batch` per
    transaction. Concurrent callers take disjoint batches (`FOR UPDATE SKIP LOCKED` on
    PostgreSQL); a batch that fails as a whole is retried one event per savepoint, so one bad
    event cannot hold the others back. This is what every `ingest` task runs: under load the
    first task takes many events at once and the later ones find theirs done."""
    totals = IngestTotals()
    for _ in range(INGEST_MAX_BATCHES):
        with session_scope(engine) as session:
            events = list(
                session.exec(
                    select(InboxEvent)
                    .where(InboxEvent.source == SOURCE, col(InboxEvent.processed_at).is_(None))
                    .order_by(col(InboxEvent.id))
                    .limit(batch)
                    .with_for_update(skip_locked=True)
                ).all()
            )
            if not events:
                return totals
            try:
                with session.begin_nested():
                    outcomes = apply_events(session, events)
            except (FocalloopError, sa.exc.IntegrityError):
                log.warning("a batch of %d events failed; applying one by one", len(events))
                outcomes = {}
                for event in events:
                    try:
                        with session.begin_nested():
                            outcomes.update(apply_events(session, [event]))
                    except (FocalloopError, sa.exc.IntegrityError) as error:
                        outcomes[event.id or 0] = EventOutcome(errors=[str(error)])
            for event in events:
                _mark(event, outcomes[event.id or 0], totals)
                session.add(event)
    return totals


# ------------------------------------------------------------------------------------- sync


@dataclass(frozen=True)
class SyncReport:
    tasks_seen: int
    new_revisions: int  # annotation revisions found that we had not stored (now ingested)
    withdrawn: int  # our labels whose annotation no longer exists in Label Studio
    rejected: int
    event_ids: list[int]


def sync_annotations(engine: sa.Engine, project_name: str, settings: Settings) -> SyncReport:
    """Make our Label Studio answers equal Label Studio's: every annotation revision we lack is
    stored through the inbox (same checks as a webhook), and every annotation we hold that Label
    Studio no longer has is withdrawn. Catches whatever webhooks missed (our API down, a
    delivery lost: Label Studio does not retry), deletions included, which a "changed since"
    query alone cannot see."""
    started = utcnow()
    with session_scope(engine) as session:
        project = get_project(session, project_name)
        link = LabelStudioLink.of(project)
        project_id = project.id or 0
        stored_revisions = {
            (external_id, updated_at)
            for external_id, updated_at in session.execute(
                sa.select(col(Annotation.external_id), col(Annotation.external_updated_at)).where(
                    col(Annotation.project_id) == project_id, col(Annotation.source) == SOURCE
                )
            )
        }
    remote = gateway(link, settings)
    tasks: list[RemoteTask] = list(remote.list_tasks(link.project_id))
    remote_ids: set[str] = set()
    missing: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for task in tasks:
        for annotation in task.annotations:
            annotation_id = annotation.get("id")
            if not isinstance(annotation_id, int):
                continue
            remote_ids.add(str(annotation_id))
            try:
                parsed = parse_annotation(annotation, task.raw)
            except InvalidInput:
                continue
            if (str(annotation_id), parsed.updated_at) not in stored_revisions:
                missing.append((annotation, task.raw))
    event_ids: list[int] = []
    with session_scope(engine) as session:
        for annotation, task_raw in missing:
            body = {"action": SYNC_ACTION, "annotation": annotation, "task": task_raw}
            event = InboxEvent(
                source=SOURCE,
                event_key=event_key(SYNC_ACTION, body),
                action="ANNOTATION_UPDATED",
                project_id=project_id,
                payload=body,
            )
            try:
                with session.begin_nested():
                    session.add(event)
                event_ids.append(event.id or 0)
            except sa.exc.IntegrityError:
                # The same revision is already in the inbox (a webhook delivered it): process it.
                existing = session.exec(
                    select(InboxEvent.id).where(
                        InboxEvent.source == SOURCE, InboxEvent.event_key == event.event_key
                    )
                ).one()
                event_ids.append(existing or 0)
    rejected = ingest_pending(engine).rejected
    withdrawn = 0
    with session_scope(engine) as session:
        ours = {
            external_id
            for (external_id,) in session.execute(
                sa.select(col(Annotation.external_id))
                .where(
                    col(Annotation.project_id) == project_id,
                    col(Annotation.source) == SOURCE,
                    col(Annotation.withdrawn_at).is_(None),
                    col(Annotation.created_at) < started,
                )
                .distinct()
            )
        }
        for external_id in sorted(ours - remote_ids):
            withdrawn += withdraw_annotation(
                session, project_id=project_id, source=SOURCE, external_id=external_id
            )
        project = get_project(session, project_name, for_update=True)
        project.labeler = {**project.labeler, "last_sync_at": started.isoformat()}
        session.add(project)
    return SyncReport(
        tasks_seen=len(tasks),
        new_revisions=len(missing),
        withdrawn=withdrawn,
        rejected=rejected,
        event_ids=event_ids,
    )


def reconcile_all(engine: sa.Engine, settings: Settings) -> None:
    """For every connected project: create tasks a hand-off left pending (Label Studio was
    down, or the pusher died) and reconcile its answers (what webhooks missed, deletions
    included). One project's failure is logged and does not stop the others."""
    with session_scope(engine) as session:
        names = connected_projects(session)
    for name in names:
        try:
            pushed = push_pending(engine, name, settings)
            if pushed.created or pushed.adopted:
                log.info("pushed %s's pending tasks to Label Studio: %s", name, pushed)
            report = sync_annotations(engine, name, settings)
        except FocalloopError:
            log.exception("sync of %s with Label Studio failed", name)
            continue
        if report.new_revisions or report.withdrawn:
            log.info("synced %s with Label Studio: %s", name, report)


def connected_projects(session: Session) -> list[str]:
    return sorted(
        project.name
        for project in session.exec(select(Project)).all()
        if project.labeler.get("kind") == KIND
    )
