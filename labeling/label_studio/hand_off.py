"""A cycle's hand-off to Label Studio: plan the batch's tasks (hardest first, each with the
model's prediction), push them, refresh the predictions of tasks still waiting, and bump Label
Studio's model version. Every step can be repeated without creating a task twice."""

import io

import numpy as np
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlmodel import Session, col, select

from labeling.label_studio.gateway import LabelStudioGateway
from labeling.label_studio.link import LabelStudioLink, gateway
from labeling.label_studio.payloads import prediction_payload, unanchored_prediction
from labeling.label_studio.tasks import PushReport, push_pending
from services.artifacts import model_version_name
from services.config import Settings
from services.datasets.store import open_store
from services.db import session_scope
from services.errors import NotFound
from services.models import (
    Cycle,
    CycleSelection,
    CycleState,
    Item,
    ItemStatus,
    LabelTask,
    LabelTaskState,
    Project,
    ScoreChunk,
    utcnow,
)
from services.state import (
    transition_item,
)


def cycle_scores(
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
    """Open tasks get this cycle's model version in place of an older one, so Label Studio's
    stream (uncertainty sampling: the current version's predictions, ascending score) always
    holds every open task in the current model's order: ordinary tasks with this cycle's
    prediction, evaluation items and reviews with an unanchored one."""
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        assert cycle is not None
        project = session.get(Project, cycle.project_id)
        assert project is not None
        link = LabelStudioLink.of(project)
        if cycle.model_version is None:
            return 0
        version = model_version_name(project, cycle.model_version)
        stale = session.execute(
            select(LabelTask, col(Item.eval_set))
            .join(Item, col(Item.id) == col(LabelTask.item_id))
            .where(
                LabelTask.project_id == project.id,
                LabelTask.state == LabelTaskState.OPEN,
                sa.or_(
                    sa.and_(col(LabelTask.kind) == "label", col(Item.status) == ItemStatus.QUEUED),
                    sa.and_(
                        col(LabelTask.kind) == "review",
                        col(Item.status) == ItemStatus.IN_REVIEW,
                    ),
                ),
                sa.or_(
                    col(LabelTask.model_version).is_(None),
                    col(LabelTask.model_version) != version,
                ),
            )
        ).all()
        anchored = [row for row, evaluation in stale if row.kind == "label" and not evaluation]
        unanchored = [row for row, evaluation in stale if row.kind != "label" or evaluation]
        scores = cycle_scores(
            session, project, cycle_id, {row.item_id for row in anchored}, settings
        )
        updates: list[tuple[LabelTask, tuple[str, float] | None]] = [
            (row, scores[row.item_id]) for row in anchored if row.item_id in scores
        ]
        updates += [(row, None) for row in unanchored]
        predictions = [
            (
                int(row.external_task_id or 0),
                prediction_payload(prediction, version, modality=project.modality)
                if prediction is not None
                else unanchored_prediction(version),
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
                        "prediction_label": prediction[0] if prediction else None,
                        "prediction_score": prediction[1] if prediction else None,
                        "updated_at": now,
                    }
                    for row, prediction in updates
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
            col(Item.eval_set),
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
    for item_id, predicted, probability, model_version, evaluation in rows:
        task = existing.get(item_id)
        if task is not None:
            if task.state == LabelTaskState.OPEN:
                transition_item(session, item_id, ItemStatus.QUEUED)
            continue
        has_prediction = predicted is not None and probability is not None
        if evaluation:
            # An evaluation item's task shows no model answer (it is there to judge the
            # model); the cycle's version alone gives it the unanchored prediction that
            # serves it first.
            version = cycle.model_version
            predicted = probability = None
        else:
            version = model_version if has_prediction else None
        session.add(
            LabelTask(
                project_id=project.id or 0,
                item_id=item_id,
                kind="label",
                cycle_id=cycle.id,
                model_version=(
                    model_version_name(project, int(version)) if version is not None else None
                ),
                prediction_label=predicted,
                prediction_score=float(probability) if probability is not None else None,
            )
        )
        planned += 1
    session.flush()
    return planned


def hand_off(engine: sa.Engine, cycle_id: int, settings: Settings) -> PushReport:
    """A cycle's hand-off to Label Studio: plan, push, refresh the open tasks' predictions, bump
    Label Studio's model version (the hand-off stage then finishes the cycle). Every step can
    be repeated after a crash or a redelivered message without creating a task twice."""
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
