"""The train stage: claim the cycle's training (a lease whose attempt number fences every write),
train on the dataset version's training rows with the project's recipe, judge the model against
the current one, record it with the gate's decision, plan label-noise reviews, and fan scoring
out (one chunk per pool shard), or go straight to selection on a cold start.

A redelivered message for a cycle that moved on, or whose lease another worker holds, does
nothing; a `PermanentError` (a non-finite loss, an unavailable device) fails the cycle at once.
"""

from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from numpy.typing import NDArray
from sqlmodel import Session, func, select

from labeling.base import ReviewPolicy
from labeling.registry import labeler_for
from services import logs
from services.artifacts import load_model, model_version_name, save_model
from services.config import Settings
from services.curve import curve_summary
from services.cycle.budget import allowance_now
from services.cycle.data import (
    is_cold_start,
    load_items,
    project_store,
    scored_shards,
    training_data,
)
from services.cycle.evaluate import EvaluationSet, Judged, judge
from services.cycle.flow import Stage, Step
from services.cycle.leases import (
    cancel_if_requested,
    claim_training,
    fail_cycle,
    lease_renewal,
    renew_training_lease,
)
from services.cycle.progress import TrainingProgress
from services.cycle.review import ReviewCandidate, plan_reviews, review_candidates
from services.cycle.seeds import Purpose, derive_seed
from services.db import session_scope
from services.errors import NotFound, PermanentError
from services.evaluation_set import eval_labels
from services.gate import GateConfig, gate_config
from services.ml.checkpoint import Checkpoint
from services.ml.nets import ModelSpec, spec_for_inputs
from services.ml.train import TrainResult, torch_threads
from services.models import (
    Cycle,
    CycleState,
    ModelVersion,
    Project,
    Promotion,
    ScoreChunk,
    utcnow,
)
from services.promotion import current_model
from services.recipe import Recipe, fit, project_recipe
from services.state import transition_cycle


@dataclass(frozen=True)
class _Inputs:
    """Everything training reads, gathered in one short transaction (training itself holds
    none). items [m, *shape], labels [m] class indices, item_ids [m] database ids."""

    project: Project
    number: int
    items: NDArray[np.float32]
    labels: NDArray[np.int64]
    item_ids: NDArray[np.int64]
    spec: ModelSpec
    recipe: Recipe
    previous: Checkpoint | None
    has_current: bool
    gate: GateConfig
    evaluation: EvaluationSet
    reviews: ReviewPolicy | None


def train_stage(engine: sa.Engine, settings: Settings, step: Step) -> list[Step]:
    cycle_id = step.target
    attempt, following = _begin(engine, cycle_id, settings)
    if attempt is None:
        return following
    inputs = _gather(engine, cycle_id, settings)
    seed = derive_seed(inputs.project.seed, inputs.number, Purpose.TRAIN)
    try:
        with (
            torch_threads(settings.torch_threads),
            lease_renewal(
                lambda: renew_training_lease(engine, cycle_id, attempt, settings),
                settings.lease_s / 3,
            ) as lost,
        ):
            result = fit(
                items=inputs.items,
                labels=inputs.labels,
                spec=inputs.spec,
                recipe=inputs.recipe,
                seed=seed,
                previous=inputs.previous,
                on_epoch=TrainingProgress(engine, cycle_id, attempt),
            )
            judged = judge(
                labels=list(inputs.project.labels),
                result=result,
                training=(inputs.items, inputs.labels),
                evaluation=inputs.evaluation,
                current=inputs.previous,
                has_current=inputs.has_current,
                gate=inputs.gate,
                settings=settings,
            )
    except PermanentError as error:
        # Retrying cannot help (a non-finite loss, a device that does not exist): fail the
        # cycle now, with the reason, instead of after every attempt's lease has run out.
        with session_scope(engine) as session:
            fail_cycle(session, cycle_id, f"training failed: {error}")
        return []
    if lost.is_set():
        return []  # another attempt owns the cycle now
    reviews = _review_candidates(inputs)
    prefix = save_model(
        project_store(inputs.project, settings),
        inputs.project,
        result,
        cycle_id=cycle_id,
        attempt=attempt,
    )
    return _record(engine, cycle_id, attempt, result, judged, prefix, reviews)


def _begin(engine: sa.Engine, cycle_id: int, settings: Settings) -> tuple[int | None, list[Step]]:
    """(the training attempt claimed, []) or (None, the steps that follow instead: selection on
    a cold start, nothing when the cycle is cancelled, moved on or held by another worker)."""
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        if cycle is None:
            raise NotFound(f"no cycle with id {cycle_id}")
        if cancel_if_requested(session, cycle):
            return None, []
        project = session.get(Project, cycle.project_id)
        assert project is not None
        logs.bind(project=project.name, cycle_id=cycle.id)
        if cycle.state == CycleState.PENDING and is_cold_start(session, project, cycle, settings):
            transition_cycle(session, cycle_id, CycleState.SELECTING)
            return None, [Step(Stage.SELECT, cycle_id)]
        attempt = claim_training(session, cycle_id, settings)
        if attempt is None:
            return None, []
        if attempt > settings.max_train_attempts:
            fail_cycle(
                session,
                cycle_id,
                f"training did not finish in {settings.max_train_attempts} attempts "
                "(worker lost or lease expired each time)",
            )
            return None, []
        return attempt, []


def _gather(engine: sa.Engine, cycle_id: int, settings: Settings) -> _Inputs:
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        assert cycle is not None and cycle.dataset_version is not None
        project = session.get(Project, cycle.project_id)
        assert project is not None
        items, labels, item_ids = training_data(session, project, cycle.dataset_version, settings)
        current = current_model(session, project)
        evaluation = eval_labels(session, project)
        eval_items = (
            load_items(session, project, evaluation.item_ids, settings)
            if evaluation.item_ids
            else None
        )
    spec = spec_for_inputs(items.shape[1:], n_classes=len(project.labels), labeled=len(labels))
    previous = load_model(project, current, settings) if current is not None else None
    return _Inputs(
        project=project,
        number=cycle.number,
        items=items,
        labels=labels,
        item_ids=item_ids,
        spec=spec,
        recipe=project_recipe(project, device=settings.device, threads=settings.torch_threads),
        # The label set grew: the current model's head does not fit, so it can neither warm
        # start the new one nor be compared with it on the same classes. Another architecture
        # (a small image's MLP before the CNN takes over) still judges; `fit` warm-starts only
        # from the same spec.
        previous=previous
        if previous is not None and previous.spec.n_classes == spec.n_classes
        else None,
        has_current=current is not None,
        gate=gate_config(project),
        evaluation=EvaluationSet(evaluation, eval_items),
        reviews=labeler_for(project).review_policy(project),
    )


def _review_candidates(inputs: _Inputs) -> list[ReviewCandidate]:
    if inputs.reviews is None:
        return []
    return review_candidates(
        inputs.items,
        inputs.labels,
        inputs.item_ids,
        n_classes=len(inputs.project.labels),
        threshold=inputs.reviews.threshold,
        limit=inputs.reviews.per_cycle,
        seed=derive_seed(inputs.project.seed, inputs.number, Purpose.REVIEW),
    )


def _record(
    engine: sa.Engine,
    cycle_id: int,
    attempt: int,
    result: TrainResult,
    judged: Judged,
    prefix: str,
    reviews: list[ReviewCandidate],
) -> list[Step]:
    """Record the model (fenced by the attempt), plan reviews, and create the score chunks:
    the shards holding unlabeled or queued items, or only queued ones when the budget leaves
    nothing to select."""
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        assert cycle is not None
        if cycle.state != CycleState.TRAINING or cycle.train_attempts != attempt:
            return []
        if cancel_if_requested(session, cycle):
            return []
        project = session.get(Project, cycle.project_id)
        assert project is not None
        model = record_model(session, project, cycle, result, prefix, judged)
        # A rejected model is kept for the record; the current one goes on scoring.
        scorer = model if model.promotion == Promotion.CURRENT else current_model(session, project)
        if scorer is None:
            # The first model was refused (collapsed): nothing can score, so this cycle picks
            # its batch as a cold start does, and the next one trains from scratch.
            cycle.lease_expires_at = None
            session.add(cycle)
            session.flush()
            transition_cycle(session, cycle_id, CycleState.SCORING)  # with nothing to score
            transition_cycle(session, cycle_id, CycleState.SELECTING)
            return [Step(Stage.SELECT, cycle_id)]
        plan_reviews(
            session, project, cycle_id, reviews, model_version_name(project, scorer.version)
        )
        shards = scored_shards(session, project, selecting=allowance_now(session, project) > 0)
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
            return [Step(Stage.SELECT, cycle_id)]
        return [Step(Stage.SCORE, chunk.id or 0) for chunk in chunks]


def record_model(
    session: Session,
    project: Project,
    cycle: Cycle,
    result: TrainResult,
    prefix: str,
    judged: Judged,
) -> ModelVersion:
    """The model version row with the gate's decision; a promoted model retires the current
    one, a rejected one leaves it current."""
    number = (
        session.exec(
            select(func.max(ModelVersion.version)).where(ModelVersion.project_id == project.id)
        ).one()
        or 0
    ) + 1
    promoted = judged.decision.promotion == Promotion.CURRENT
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
        metrics=judged.metrics,
        summary=curve_summary(judged.metrics),
        promotion=judged.decision.promotion,
        promotion_reason=judged.decision.reason[:2000],
        promoted_at=utcnow() if promoted else None,
    )
    session.add(model)
    session.flush()
    return model
