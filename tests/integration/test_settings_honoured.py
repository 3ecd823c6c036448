"""The settings every stage must honour, each shown by a test that fails if one stage ignores
it: the project's seed (every random choice), the label budget (every label a person gives
counts, evaluation answers too, and the last ones are trained on), and the device."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import col, select

from labeling.base import ReviewPolicy
from labeling.registry import LABELERS
from labeling.simulated import SimulatedLabeler
from services import db
from services.api import create_app
from services.auth import create_token
from services.config import Settings
from services.cycle import select as select_stage_module
from services.cycle import train as train_stage_module
from services.cycle.budget import labels_spent
from services.cycle.flow import Stage
from services.cycle.runner import run_cycle
from services.cycle.seeds import Purpose, derive_seed
from services.cycle.start import cancel_cycle, start_cycle
from services.cycle.trigger import maybe_start_cycle
from services.errors import InvalidInput
from services.models import Cycle, CycleSelection, CycleState, Item, ModelVersion, ScoreChunk
from services.projects import ProjectSpec, create_project, get_project, update_project
from services.simulation.deployment import Deployment, ProjectSettings, deploy
from services.state import create_cycle, transition_cycle
from tests.conftest import Digits
from tests.integration.cycle_helpers import cycle_row, make_digits_project, stage


def _run(engine: sa.Engine, name: str, settings: Settings, cycles: int) -> None:
    for _ in range(cycles):
        cycle = maybe_start_cycle(engine, name, settings)
        assert cycle is not None
        run_cycle(engine, cycle.id or 0, settings)
        assert cycle_row(engine, cycle.id or 0).state == "done"


def _observed(engine: sa.Engine, name: str) -> dict[str, Any]:
    """What each random choice decided: the evaluation set, each cycle's picks (by external
    id), each model's training curve."""
    with db.session_scope(engine) as session:
        project = get_project(session, name)
        evaluation = sorted(
            session.exec(
                select(Item.external_id).where(
                    Item.project_id == project.id, col(Item.eval_set).is_(True)
                )
            ).all()
        )
        picks: dict[int, list[str]] = {}
        for cycle in session.exec(
            select(Cycle).where(Cycle.project_id == project.id).order_by(col(Cycle.number))
        ).all():
            picks[cycle.number] = [
                external_id
                for external_id in session.exec(
                    select(Item.external_id)
                    .join(CycleSelection, col(CycleSelection.item_id) == col(Item.id))
                    .where(CycleSelection.cycle_id == cycle.id)
                    .order_by(col(CycleSelection.rank))
                ).all()
            ]
        curves = [
            model.metrics["train_loss"]
            for model in session.exec(
                select(ModelVersion)
                .where(ModelVersion.project_id == project.id)
                .order_by(col(ModelVersion.version))
            ).all()
        ]
    return {"evaluation": evaluation, "picks": picks, "curves": curves}


def _seeded_project(
    folder: Path, settings: Settings, digits: Digits, *, seed: int, strategy: str, offset: int
) -> Deployment:
    """Ten digit classes, 20 seed labels without an 8 (so cold start explores for it from the
    first cycle), an evaluation set; `offset` cycles of another project come first, so this
    project's cycles get other database ids."""
    items, labels = digits.features[:300], digits.labels[:300]
    run = deploy(
        folder,
        settings,
        items=items,
        labels=labels,
        n_classes=10,
        seeded=np.flatnonzero(labels != 8)[:20].astype(np.int64),
        project=ProjectSettings(
            loss={},
            selection={"strategy": strategy},
            batch_size=20,
            label_budget=None,
            seed=seed,
            noise=0.0,
        ),
    )
    with db.session_scope(run.engine) as session:
        update_project(session, run.project, gate={"eval_fraction": 0.05})
        other = create_project(
            session,
            ProjectSpec(
                name="other",
                labels=["a", "b"],
                modality="features",
                store_url=f"file://{folder / 'other'}",
            ),
        )
        for _ in range(offset):
            cycle = create_cycle(session, project_id=other.id or 0, trigger="test")
            transition_cycle(session, cycle.id or 0, CycleState.CANCELLED)
    return run


@pytest.mark.slow
def test_every_random_choice_follows_the_project_seed_and_nothing_else(
    settings: Settings, digits: Digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cold start clusters a sample of the pool past this size: make the sample seeded here too.
    monkeypatch.setattr(select_stage_module, "COLD_START_SAMPLE", 200)
    settings = settings.model_copy(update={"pool_shard_items": 100, "torch_threads": 1})
    reviewed: list[int] = []

    class Reviewing(SimulatedLabeler):
        def review_policy(self, project: Any) -> ReviewPolicy | None:
            return ReviewPolicy(threshold=0.05, per_cycle=5)

    def spy(*args: Any, seed: int, **kwargs: Any) -> list[Any]:
        reviewed.append(seed)
        return []

    monkeypatch.setitem(LABELERS, "simulated", Reviewing)
    monkeypatch.setattr(train_stage_module, "review_candidates", spy)
    seen: dict[tuple[int, str, int], dict[str, Any]] = {}
    for seed in (0, 1):
        for strategy in ("least_confidence", "random"):
            for offset in (0, 3):
                folder = tmp_path / f"{seed}-{strategy}-{offset}"
                folder.mkdir()
                run = _seeded_project(
                    folder, settings, digits, seed=seed, strategy=strategy, offset=offset
                )
                _run(run.engine, run.project, run.settings, cycles=2)
                seen[(seed, strategy, offset)] = _observed(run.engine, run.project)
                with db.session_scope(run.engine) as session:
                    first = session.exec(select(Cycle).where(Cycle.trigger == "first cycle")).one()
                assert first.id == offset + 1  # other ids, the same decisions (below)
                assert (first.cold_start_picks or 0) > 0  # cold start took part
                run.engine.dispose()
    for key in [(s, k) for s in (0, 1) for k in ("least_confidence", "random")]:
        assert seen[(*key, 0)] == seen[(*key, 3)], key  # reproducible whatever the ids
        assert len(seen[(*key, 0)]["curves"]) == 2  # both cycles trained
    zero, one = seen[(0, "least_confidence", 0)], seen[(1, "least_confidence", 0)]
    assert zero["evaluation"] != one["evaluation"]  # the evaluation set's sample
    assert zero["picks"][1] != one["picks"][1]  # cold start (on a seeded sample)
    assert zero["curves"] != one["curves"]  # training: initialization and shuffling
    strategy_picks = []
    for seed in (0, 1):
        observed = seen[(seed, "random", 0)]
        evaluation = set(observed["evaluation"])
        strategy_picks.append([p for p in observed["picks"][2] if p not in evaluation])
    assert strategy_picks[0] != strategy_picks[1]  # a random strategy's scores
    # The review's folds: derived from the project seed and the cycle's number.
    assert sorted(set(reviewed)) == sorted(
        {derive_seed(seed, number, Purpose.REVIEW) for seed in (0, 1) for number in (1, 2)}
    )


@pytest.mark.slow
def test_the_budget_counts_every_answer_and_its_last_labels_are_trained_on(
    engine: sa.Engine, settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"pool_shard_items": 200})
    project = make_digits_project(
        engine,
        settings,
        digits,
        tmp_path,
        label_budget=50,
        retrain_min_new_labels=20,
        gate={"eval_fraction": 0.1},
    )
    cycles: list[Cycle] = []
    while (cycle := maybe_start_cycle(engine, project.name, settings)) is not None:
        if cycle.trigger.startswith("budget spent") and not any(
            c.state == "cancelled" for c in cycles
        ):
            # A last cycle that does not finish (cancelled here; a failure alike) leaves the
            # last labels untrained: the next trigger starts another.
            with db.session_scope(engine) as session:
                cancel_cycle(session, project.name)
            cycles.append(cycle_row(engine, cycle.id or 0))
            continue
        run_cycle(engine, cycle.id or 0, settings)
        cycles.append(cycle_row(engine, cycle.id or 0))
        assert len(cycles) <= 6
    assert [c.state for c in cycles] == ["done", "done", "done", "cancelled", "done"]
    cycles = [c for c in cycles if c.state == "done"]
    # 20 + 20 asked for, then the 10 the budget leaves, then one last training asking nothing.
    assert [c.selected_count for c in cycles] == [20, 20, 10, 0]
    assert cycles[-1].trigger == "budget spent: training on the last 10 labels"
    with db.session_scope(engine) as session:
        row = get_project(session, project.name)
        assert labels_spent(session, row) == 50
        evaluation_answers = session.exec(
            select(Item.id).where(
                Item.project_id == row.id,
                col(Item.eval_set).is_(True),
                col(Item.label).is_not(None),
            )
        ).all()
        assert len(evaluation_answers) > 0  # they count toward the 50
        newest = session.exec(
            select(ModelVersion)
            .where(ModelVersion.project_id == row.id)
            .order_by(col(ModelVersion.version).desc())
        ).first()
        assert newest is not None and newest.dataset_version == cycles[-1].dataset_version
        trained = newest.metrics["trained_items"] + newest.metrics["validation_items"]
        assert trained == 50 - len(evaluation_answers)
    with db.session_scope(engine) as session, pytest.raises(InvalidInput, match="budget"):
        start_cycle(session, project.name, trigger="cli", settings=settings)


def test_an_absent_cuda_device_fails_training_scoring_and_prediction_at_once(
    settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    import torch

    # The device does not depend on the database: SQLite shows it.
    engine = db.make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    db.upgrade(engine)
    assert not torch.cuda.is_available()  # CI never has a GPU; this test needs none
    cpu = settings.model_copy(update={"pool_shard_items": 200, "device": "cpu"})
    cuda = cpu.model_copy(update={"device": "cuda"})
    project = make_digits_project(engine, cpu, digits, tmp_path)
    _run(engine, project.name, cpu, cycles=2)  # a model, trained on the CPU as told
    with db.session_scope(engine) as session:
        model = session.exec(select(ModelVersion)).first()
        assert model is not None and model.parameters["device"] == "cpu"

    # Training: the cycle fails on the first attempt, with the reason.
    cycle = maybe_start_cycle(engine, project.name, cuda)
    assert cycle is not None
    assert stage(engine, cuda, Stage.TRAIN, cycle.id or 0) == []
    failed = cycle_row(engine, cycle.id or 0)
    assert (failed.state, failed.train_attempts) == ("failed", 1)
    assert "training failed: device 'cuda' was requested" in (failed.failure_reason or "")

    # Scoring: trained on the CPU, scored by a process told to use CUDA.
    scoring = start_cycle_now(engine, project.name, cpu)
    chunks = [s.target for s in stage(engine, cpu, Stage.TRAIN, scoring) if s.stage == Stage.SCORE]
    assert stage(engine, cuda, Stage.SCORE, chunks[0]) == []
    failed = cycle_row(engine, scoring)
    assert failed.state == "failed"
    assert "DeviceUnavailable: device 'cuda' was requested" in (failed.failure_reason or "")
    with db.session_scope(engine) as session:
        chunk = session.get(ScoreChunk, chunks[0])
        assert chunk is not None and (chunk.state, chunk.attempts) == ("failed", 1)

    # Prediction through the API: the server's configuration, not the request, is wrong.
    with db.session_scope(engine) as session:
        _, secret = create_token(session, name="reader", scope="read", actor="test")
    with TestClient(create_app(cuda, engine=engine)) as client:
        answer = client.post(
            f"/api/v1/projects/{project.name}/predict",
            headers={"Authorization": f"Bearer {secret}"},
            json={"features": [np.zeros(64).tolist()]},
        )
    assert answer.status_code == 503
    assert "no CUDA device is available" in answer.json()["detail"]
    engine.dispose()


def start_cycle_now(engine: sa.Engine, name: str, settings: Settings) -> int:
    with db.session_scope(engine) as session:
        return start_cycle(session, name, trigger="test", settings=settings).id or 0
