"""The evaluation set and the promotion gate, through real cycles on the digits pool."""

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import col, func, select

from services import db
from services.audit import list_entries
from services.config import Settings
from services.cycle.start import start_cycle
from services.datasets.snapshot import snapshot
from services.datasets.store import open_store
from services.datasets.versions import read_version
from services.errors import Conflict, InvalidInput
from services.evaluation_set import reserve_eval_set
from services.models import (
    Cycle,
    CycleSelection,
    Item,
    ModelVersion,
    Project,
    Promotion,
    utcnow,
)
from services.projects import get_project
from services.promotion import make_current
from services.state import AnnotationInput, record_annotations
from tests.conftest import Digits
from tests.integration.cycle_helpers import cycle_row, make_digits_project, run_stages
from tests.integration.test_cycles import begin

pytestmark = pytest.mark.slow


@pytest.fixture
def cycle_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"pool_shard_items": 200, "lease_s": 30.0})


def _eval_ids(engine: sa.Engine, name: str) -> set[int]:
    with db.session_scope(engine) as session:
        project = get_project(session, name)
        return {
            item_id
            for item_id in session.exec(
                select(Item.id).where(Item.project_id == project.id, col(Item.eval_set).is_(True))
            ).all()
            if item_id is not None
        }


def _models(engine: sa.Engine, name: str) -> list[ModelVersion]:
    with db.session_scope(engine) as session:
        project = get_project(session, name)
        return list(
            session.exec(
                select(ModelVersion)
                .where(ModelVersion.project_id == project.id)
                .order_by(col(ModelVersion.version))
            ).all()
        )


def _external_ids(engine: sa.Engine, ids: set[int]) -> set[str]:
    with db.session_scope(engine) as session:
        return set(session.exec(select(Item.external_id).where(col(Item.id).in_(ids))).all())


def test_evaluation_items_lead_batches_judge_models_then_become_training_data(
    engine: sa.Engine, cycle_settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    project = make_digits_project(
        engine,
        cycle_settings,
        digits,
        tmp_path,
        gate={"eval_fraction": 0.1, "eval_batch_share": 0.5, "eval_rounds": 2},
    )
    first = begin(engine, project.name, cycle_settings)
    evaluation = _eval_ids(engine, project.name)
    assert len(evaluation) == 60  # 10% of 600
    for _ in range(7):
        run_stages(engine, first, cycle_settings)
        assert cycle_row(engine, first).state == "done"
        first = begin(engine, project.name, cycle_settings)
    run_stages(engine, first, cycle_settings)

    with db.session_scope(engine) as session:
        row = get_project(session, project.name)
        selections = session.exec(
            select(CycleSelection)
            .join(Cycle, col(Cycle.id) == col(CycleSelection.cycle_id))
            .where(Cycle.project_id == row.id)
            .order_by(col(CycleSelection.cycle_id), col(CycleSelection.rank))
        ).all()
    by_cycle: dict[int, list[CycleSelection]] = {}
    for selection in selections:
        by_cycle.setdefault(selection.cycle_id, []).append(selection)
    # The first batch (a cold start: no model to judge yet) has no evaluation item; then half
    # of each batch (10 of 20) goes to them, first, without a prediction, and no strategy ever
    # picks one.
    assert [sum(s.evaluation for s in rows) for rows in by_cycle.values()] == [0] + [10] * 7
    everything_evaluated = _eval_ids(engine, project.name)
    for rows in by_cycle.values():
        flags = [s.evaluation for s in rows]
        assert flags == sorted(flags, reverse=True)
        assert all((s.item_id in everything_evaluated) == s.evaluation for s in rows)
        assert all(s.predicted_label is None for s in rows if s.evaluation)
    # Items that judged two models were released into training and the set took fresh ones.
    assert len(everything_evaluated) > 60

    store = open_store(f"file://{tmp_path / 'store'}", cycle_settings)
    models = _models(engine, project.name)
    assert len(models) >= 6
    external_eval = _external_ids(engine, everything_evaluated)
    released_seen = 0
    for model in models:
        _, table = read_version(store, project.name, model.dataset_version)
        rows_in_version = table["item_id"].to_pylist()
        held = sum(model.metrics["evaluation_labels"].values())
        # Trained on every row but the held evaluation items, which judged it instead.
        assert model.metrics["trained_items"] + model.metrics["validation_items"] == (
            len(rows_in_version) - held
        )
        released_seen = max(released_seen, sum(e in external_eval for e in rows_in_version) - held)
        assert str(model.promotion_reason).startswith(("promoted", "rejected: "))
        assert "collapsed" not in str(model.promotion_reason)
    assert released_seen > 0  # some evaluation labels became training data
    # The newest model was judged on the held items only: fewer than every evaluation label.
    newest = models[-1]
    with db.session_scope(engine) as session:
        labeled_evaluation = session.exec(
            select(func.count())
            .select_from(Item)
            .where(col(Item.id).in_(everything_evaluated), col(Item.label).is_not(None))
        ).one()
    held = sum(newest.metrics["evaluation_labels"].values())
    assert newest.metrics["evaluation"]["n_items"] == held
    assert 0 < held < labeled_evaluation


def test_the_gate_refuses_a_sabotaged_model_and_people_override_it(
    engine: sa.Engine, cycle_settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    # A fixed evaluation set (eval_rounds null): the first batch is a cold start (no evaluation
    # item before a model exists), the next three are all evaluation items (share 1.0).
    project = make_digits_project(
        engine,
        cycle_settings,
        digits,
        tmp_path,
        batch_size=40,
        retrain_min_new_labels=40,
        gate={"eval_fraction": 0.2, "eval_batch_share": 1.0, "eval_rounds": None},
    )
    first = begin(engine, project.name, cycle_settings)
    evaluation = _eval_ids(engine, project.name)
    assert len(evaluation) == 120
    for _ in range(6):
        run_stages(engine, first, cycle_settings)
        first = begin(engine, project.name, cycle_settings)
    run_stages(engine, first, cycle_settings)
    # Reserving again adds nothing: a fixed set keeps its items and its size.
    with db.session_scope(engine) as session:
        assert reserve_eval_set(session, get_project(session, project.name), seed=99) == 0
    assert _eval_ids(engine, project.name) == evaluation
    models = _models(engine, project.name)
    newest = models[-1]
    assert newest.metrics["evaluation"]["n_items"] == 120
    assert newest.promotion == Promotion.CURRENT
    assert str(newest.promotion_reason).startswith("promoted: macro-F1 ")
    assert "on 120 evaluation items" in str(newest.promotion_reason)

    # A model trained on sabotaged labels (all training "eight"s but one relabeled "other", so
    # two classes remain) loses the rare class's recall: the gate rejects it and the current
    # model goes on scoring.
    with db.session_scope(engine) as session:
        row = get_project(session, project.name)
        eights = [
            item_id
            for item_id in session.exec(
                select(Item.id).where(
                    Item.project_id == row.id,
                    Item.label == "eight",
                    col(Item.eval_set).is_(False),
                )
            ).all()
            if item_id is not None
        ]
        assert len(eights) >= 3
        record_annotations(
            session,
            [
                AnnotationInput(
                    item_id=item_id,
                    label="other",
                    source="cli",
                    external_id=f"sabotage-{item_id}",
                    updated_at=utcnow(),
                    annotator="saboteur",
                )
                for item_id in sorted(eights)[1:]
            ],
        )
        snapshot(session, row, settings=cycle_settings)
        sabotaged = start_cycle(session, project.name, trigger="test", settings=cycle_settings)
        sabotaged_id = sabotaged.id or 0
    run_stages(engine, sabotaged_id, cycle_settings)
    models = _models(engine, project.name)
    rejected, kept = models[-1], models[-2]
    assert kept.version == newest.version
    assert (rejected.promotion, kept.promotion) == (Promotion.REJECTED, Promotion.CURRENT)
    # It calls every one of the 120 held items "other": the gate says it is no better than always
    # answering "other" (were it a little better, the evident drop of eight's recall would
    # reject it, naming the class: tests/unit/test_promotion_gate.py).
    reason = str(rejected.promotion_reason)
    assert reason.startswith(
        (
            "rejected: no better than a constant predictor: ",
            "rejected: recall dropped by more than 0.050 (eight recall ",
        )
    ), reason
    assert (
        rejected.metrics["evaluation"]["per_class"][1]["recall"]
        < kept.metrics["evaluation"]["per_class"][1]["recall"]
    )
    done = cycle_row(engine, sabotaged_id)
    assert (done.state, done.model_version) == ("done", kept.version)
    with db.session_scope(engine) as session:
        scored_by = set(
            session.exec(
                select(CycleSelection.model_version).where(
                    CycleSelection.cycle_id == sabotaged_id,
                    col(CycleSelection.evaluation).is_(False),
                )
            ).all()
        )
    assert scored_by == {kept.version}

    # People can override the gate and roll back; both are audited with who did it.
    with db.session_scope(engine) as session, pytest.raises(InvalidInput, match="newer"):
        make_current(
            session, project.name, rejected.version, actor="cli:bob", action="model.rollback"
        )
    with db.session_scope(engine) as session:
        make_current(
            session, project.name, rejected.version, actor="cli:alice", action="model.promote"
        )
    with db.session_scope(engine) as session, pytest.raises(Conflict):
        make_current(
            session, project.name, rejected.version, actor="cli:alice", action="model.promote"
        )
    with db.session_scope(engine) as session:
        make_current(session, project.name, kept.version, actor="cli:bob", action="model.rollback")
    models = _models(engine, project.name)
    assert [m.promotion for m in models[-2:]] == [Promotion.CURRENT, Promotion.RETIRED]
    assert str(models[-2].promotion_reason).startswith("rolled back by cli:bob")
    with db.session_scope(engine) as session:
        row = session.exec(select(Project).where(Project.name == project.name)).one()
        entries = list_entries(session, project_id=row.id)
    assert [(e.actor, e.action, e.target) for e in entries] == [
        ("cli:bob", "model.rollback", f"model:m{kept.version}"),
        ("cli:alice", "model.promote", f"model:m{rejected.version}"),
    ]
