"""focalloop as a Label Studio model backend: the predictions Label Studio asks for ("Retrieve
predictions", a task opened without one) are those the hand-off gives, read from the scores of
the newest cycle that scored the pool, under the same model version. Nothing is computed here:
a model backend answers within Label Studio's timeouts (1 s for /health, 100 s for /predict),
and the cycle already scored every open task.

Evaluation items and reviews get an empty result (nothing pre-selected), as in the hand-off.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from labeling.label_studio.hand_off import cycle_scores
from labeling.label_studio.payloads import prediction_payload, task_item, unanchored_prediction
from services.artifacts import model_version_name
from services.config import Settings
from services.models import Cycle, CycleState, Item, Project, ScoreChunk


@dataclass(frozen=True)
class ServingModel:
    """The model whose predictions Label Studio holds: `cycle_id` scored the pool with it."""

    cycle_id: int
    version: str


def serving_model(session: Session, project: Project) -> ServingModel | None:
    """The newest finished cycle that scored the pool, and its model's name (what its hand-off
    gave every open task); None before any did. A cycle still scoring, or one that failed, has
    not handed its version to Label Studio."""
    row = session.exec(
        select(Cycle.id, Cycle.model_version)
        .where(
            Cycle.project_id == project.id,
            Cycle.state == CycleState.DONE,
            col(Cycle.model_version).is_not(None),
            col(Cycle.id).in_(
                select(ScoreChunk.cycle_id).where(col(ScoreChunk.scores_key).is_not(None))
            ),
        )
        .order_by(col(Cycle.id).desc())
        .limit(1)
    ).first()
    if row is None or row[1] is None:
        return None
    cycle_id, version = row
    return ServingModel(cycle_id=int(cycle_id or 0), version=model_version_name(project, version))


def predict_tasks(
    session: Session, project: Project, tasks: Sequence[Mapping[str, Any]], settings: Settings
) -> list[dict[str, Any]]:
    """One prediction per task, in order (Label Studio pairs them by position); [] before any
    model scored the pool (Label Studio then stores nothing and asks again later). A task we
    did not create, or an item the cycle did not score (labeled meanwhile), gets an empty
    result: there is no prediction of ours to show."""
    model = serving_model(session, project)
    if model is None:
        return []
    parsed = [task_item(task) for task in tasks]
    ids = {item_id for item_id, _ in parsed if item_id is not None}
    evaluation = set(
        session.exec(
            select(Item.id).where(
                Item.project_id == project.id, col(Item.id).in_(ids), col(Item.eval_set)
            )
        ).all()
    )
    anchored = {
        item_id
        for item_id, kind in parsed
        if item_id is not None and kind == "label" and item_id not in evaluation
    }
    scores = cycle_scores(session, project, model.cycle_id, anchored, settings)
    return [
        prediction_payload(scores[item_id], model.version, modality=project.modality)
        if item_id in anchored and item_id in scores
        else unanchored_prediction(model.version)
        for item_id, _ in parsed
    ]
