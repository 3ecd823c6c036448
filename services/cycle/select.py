"""The select stage: merge every chunk's candidates, let the decision core choose the batch
(evaluation items first, the model's picks, cold start while a class is missing, all within the
label budget), and mark the items selected. Runs once per cycle: a redelivery finds the cycle
past selecting and does nothing."""

import io
import logging

import numpy as np
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlmodel import Session, col

from services import logs
from services.config import Settings
from services.cycle.budget import allowance_now, items_committed, labels_spent
from services.cycle.data import (
    label_counts,
    labeled_ids,
    load_items,
    project_store,
    still_unlabeled,
    unlabeled_ids,
)
from services.cycle.decide import BatchPlan, evaluation_count, plan_batch
from services.cycle.flow import Stage, Step
from services.cycle.leases import cancel_if_requested
from services.cycle.seeds import Purpose, derive_seed
from services.cycle.tables import candidates_from_table
from services.db import session_scope
from services.errors import NotFound
from services.evaluation_set import eval_labels, waiting_evaluation
from services.gate import MIN_EVIDENCE_ITEMS, gate_config
from services.models import Cycle, CycleSelection, CycleState, ItemStatus, Project, ScoreChunk
from services.selection.candidates import Candidates, merge_candidates
from services.selection.cold_start import cold_start
from services.selection.config import SelectionConfig
from services.state import transition_cycle, transition_items

COLD_START_SAMPLE = 20_000  # unlabeled items cold start clusters at most

log = logging.getLogger(__name__)


def select_stage(engine: sa.Engine, settings: Settings, step: Step) -> list[Step]:
    cycle_id = step.target
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        if cycle is None:
            raise NotFound(f"no cycle with id {cycle_id}")
        if cancel_if_requested(session, cycle) or cycle.state != CycleState.SELECTING:
            return []
        project = session.get(Project, cycle.project_id)
        assert project is not None
        logs.bind(project=project.name, cycle_id=cycle.id)
        selection = SelectionConfig.from_dict(project.selection_config)
        allowed = allowance_now(session, project)
        share = gate_config(project).eval_batch_share
        # Evaluation labels are asked for once there is a model for them to judge: before it,
        # every pick goes to finding the classes (a cold start's labels all train).
        waiting = (
            waiting_evaluation(session, project, limit=max(allowed, 1))
            if cycle.model_version is not None
            else []
        )
        evaluation = waiting[
            : evaluation_count(
                allowance=allowed,
                share=share,
                waiting=len(waiting),
                held=len(eval_labels(session, project).item_ids),
                evidence_minimum=MIN_EVIDENCE_ITEMS,
            )
        ]
        plan = plan_batch(
            allowance=allowed,
            evaluation=evaluation,
            counts=label_counts(session, project, cycle),
            candidates=_candidates(
                session, project, cycle, selection, allowed - len(evaluation), settings
            ),
            has_model=cycle.model_version is not None,
            selection=selection,
            cold_start=lambda k, exclude: _cold_start(
                session, project, cycle, selection, k, exclude, settings
            ),
        )
        _write(session, project, cycle, plan)
        transition_cycle(session, cycle_id, CycleState.HANDING_OFF)
        return [Step(Stage.HAND_OFF, cycle_id)]


def _candidates(
    session: Session,
    project: Project,
    cycle: Cycle,
    selection: SelectionConfig,
    room: int,
    settings: Settings,
) -> Candidates | None:
    """Every chunk's candidates merged for a batch of `room` model picks (the same top-k' cut
    each chunk made, so the choice is the one a merge of everything would give), less items
    labeled since they were scored."""
    keys = [
        key
        for (key,) in session.execute(
            sa.select(col(ScoreChunk.result_key)).where(
                col(ScoreChunk.cycle_id) == cycle.id, col(ScoreChunk.result_key).is_not(None)
            )
        )
    ]
    if not keys or room < 1:
        return None
    store = project_store(project, settings)
    merged = merge_candidates(
        [candidates_from_table(pq.read_table(io.BytesIO(store.get(key)))) for key in keys],
        k_prime=room * selection.candidate_multiplier(),
    )
    live = still_unlabeled(session, merged.item_ids.tolist())
    return merged.take(np.flatnonzero(np.isin(merged.item_ids, list(live))))


def _cold_start(
    session: Session,
    project: Project,
    cycle: Cycle,
    selection: SelectionConfig,
    k: int,
    exclude: set[int],
    settings: Settings,
) -> list[int]:
    """k picks without a model over the selectable pool (less `exclude`)."""
    pool_ids = [item_id for item_id in unlabeled_ids(session, project) if item_id not in exclude]
    if not pool_ids:
        return []
    # k-means and distances over seeded samples: the whole pool would cost minutes per cycle,
    # and 20,000 items cover its clusters as well for batch-sized k.
    pool_ids = _sample(pool_ids, derive_seed(project.seed, cycle.number, Purpose.COLD_START_SAMPLE))
    features = load_items(session, project, pool_ids, settings).reshape(len(pool_ids), -1)
    labeled = None
    if selection.cold_start == "kcenter":
        known = _sample(
            labeled_ids(session, project),
            derive_seed(project.seed, cycle.number, Purpose.COLD_START_SAMPLE, 1),
        )
        if known:
            labeled = load_items(session, project, known, settings).reshape(len(known), -1)
    picks = cold_start(
        features,
        min(k, len(pool_ids)),
        method=selection.cold_start,
        seed=derive_seed(project.seed, cycle.number, Purpose.COLD_START),
        labeled=labeled,
    )
    return [pool_ids[int(p)] for p in picks]


def _sample(item_ids: list[int], seed: int) -> list[int]:
    """At most COLD_START_SAMPLE of `item_ids`, a seeded sample in id order."""
    if len(item_ids) <= COLD_START_SAMPLE:
        return item_ids
    chosen = np.random.default_rng(seed).choice(len(item_ids), COLD_START_SAMPLE, replace=False)
    return [item_ids[int(i)] for i in np.sort(chosen)]


def _why_nothing(session: Session, project: Project) -> str:
    """Why a selection came out empty, in words a user can act on."""
    if project.label_budget is not None and allowance_now(session, project) < 1:
        return (
            f"selected nothing: the label budget ({project.label_budget}) is spent or promised: "
            f"{labels_spent(session, project)} labels given, "
            f"{items_committed(session, project)} items waiting for an answer"
        )
    if not unlabeled_ids(session, project):
        return "selected nothing: the pool has no unlabeled item (add some: focalloop pool add)"
    return "selected nothing: no candidate was left after scoring"


def _write(session: Session, project: Project, cycle: Cycle, plan: BatchPlan) -> None:
    """The cycle's selection rows, in labeling order, and its items moved to selected."""
    rows = [
        CycleSelection(cycle_id=cycle.id or 0, item_id=item_id, rank=rank, evaluation=True)
        for rank, item_id in enumerate(plan.evaluation)
    ]
    rows += [
        CycleSelection(
            cycle_id=cycle.id or 0,
            item_id=pick.item_id,
            rank=len(rows) + rank,
            score=pick.score,
            predicted_label=project.labels[int(np.argmax(pick.probs))],
            probability=float(np.max(pick.probs)),
            model_version=cycle.model_version,
        )
        for rank, pick in enumerate(plan.model)
    ]
    rows += [
        CycleSelection(cycle_id=cycle.id or 0, item_id=item_id, rank=len(rows) + i, cold_start=True)
        for i, item_id in enumerate(plan.cold_start)
    ]
    if not rows:
        cycle.note = _why_nothing(session, project)
        log.info("cycle %s of %s: %s", cycle.number, project.name, cycle.note)
    session.add_all(rows)
    transition_items(session, plan.item_ids(), ItemStatus.SELECTED, expected=ItemStatus.UNLABELED)
    cycle.selected_count = len(rows)
    cycle.cold_start_picks = len(plan.cold_start)
    session.add(cycle)
    session.flush()
