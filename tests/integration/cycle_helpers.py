"""Building a real project for cycle tests, and driving a cycle's stages in-process in the same
order the Celery tasks chain them."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import sqlalchemy as sa
from sqlmodel import select

from labeling.simulated import set_simulated_labeler
from services import db
from services.config import Settings
from services.cycle.flow import Stage, Step
from services.cycle.runner import run_cycle
from services.cycle.stages import run_step
from services.cycle.trigger import maybe_start_cycle
from services.datasets.pool import add_to_pool
from services.models import Cycle, CycleSelection, Project
from services.projects import ProjectSpec, create_project
from tests.conftest import Digits
from tests.integration.conftest import unique_name


@dataclass(frozen=True)
class DigitsProject:
    """A features project over the digits (8 = "eight", the rest "other"), answered by a
    simulated annotator from the true labels."""

    name: str
    n_items: int


def make_digits_project(
    engine: sa.Engine,
    settings: Settings,
    digits: Digits,
    folder: Path,
    *,
    n_items: int = 600,
    batch_size: int = 20,
    retrain_min_new_labels: int = 20,
    label_budget: int | None = None,
    gate: dict[str, object] | None = None,
) -> DigitsProject:
    """gate: the project's promotion gate settings; by default no evaluation set, so tests of
    the cycle's mechanics see every label in training (test_promotion covers the set)."""
    if gate is None:
        gate = {"eval_fraction": 0.0}
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.array([f"d{i:04d}" for i in range(n_items)])
    np.savez(folder / "pool.npz", features=digits.features[:n_items], item_ids=ids)
    truth = pa.table(
        {
            "item_id": ids.tolist(),
            "label": np.where(digits.labels[:n_items] == 8, "eight", "other").tolist(),
        }
    )
    name = unique_name("cyc")
    with db.session_scope(engine) as session:
        project = create_project(
            session,
            ProjectSpec(
                name=name,
                labels=["other", "eight"],
                modality="features",
                store_url=f"file://{folder / 'store'}",
                batch_size=batch_size,
                retrain_min_new_labels=retrain_min_new_labels,
                label_budget=label_budget,
                gate=gate,
            ),
        )
        add_to_pool(
            session,
            project,
            str(folder / "pool.npz"),
            settings=settings,
            trusted_roots=[f"file://{folder}"],
        )
        set_simulated_labeler(session, name, truth, settings, annotator="sim")
    return DigitsProject(name=name, n_items=n_items)


def run_stages(engine: sa.Engine, cycle_id: int, settings: Settings) -> None:
    """train -> every chunk -> select -> hand off -> ingest: the flow, in this process."""
    run_cycle(engine, cycle_id, settings)


def stage(engine: sa.Engine, settings: Settings, what: Stage, target: int) -> list[Step]:
    """Run one stage on a cycle (or a chunk) and return the steps that follow it."""
    return run_step(engine, settings, Step(what, target))


def chunk_ids(steps: list[Step]) -> list[int]:
    """The chunks a train step fanned out to."""
    return [step.target for step in steps if step.stage == Stage.SCORE]


def cycle_row(engine: sa.Engine, cycle_id: int) -> Cycle:
    with db.session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        assert cycle is not None
        return cycle


def selected_items(engine: sa.Engine, project_name: str) -> list[int]:
    """Every item any cycle of the project selected (with repeats, if there were any)."""
    with db.session_scope(engine) as session:
        project = session.exec(select(Project).where(Project.name == project_name)).one()
        return list(
            session.exec(
                select(CycleSelection.item_id)
                .join(Cycle, Cycle.id == CycleSelection.cycle_id)  # type: ignore[arg-type]
                .where(Cycle.project_id == project.id)
            ).all()
        )


def project_with_models(
    engine: sa.Engine, settings: Settings, digits: Digits, folder: Path, *, cycles: int = 4
) -> DigitsProject:
    """A digits project after `cycles` real cycles, in this process: the first is a cold start
    without a model, each later one trains one (cycles - 1 models), with an evaluation set so
    models are judged on items they never trained on. Batches of 60 give even the first model
    a validation split to report on."""
    project = make_digits_project(
        engine,
        settings,
        digits,
        folder,
        batch_size=60,
        retrain_min_new_labels=60,
        gate={"eval_fraction": 0.1, "eval_batch_share": 0.5, "eval_rounds": 2},
    )
    for _ in range(cycles):
        cycle = maybe_start_cycle(engine, project.name, settings)
        assert cycle is not None and cycle.id is not None
        run_cycle(engine, cycle.id, settings)
    return project
