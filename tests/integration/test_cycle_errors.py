"""A cycle whose stage keeps failing says why while it is retried. Before, a training retrying on
a file-system error showed `training` with no reason in `cycle status` and the API; the error
was only in the worker's log."""

import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import select

from services import db
from services.api.app import create_app
from services.config import Settings
from services.cycle.flow import Stage, Step
from services.cycle.runner import drain
from services.cycle.stages import run_step
from services.cycle.start import start_cycle
from services.cycle.trigger import maybe_start_cycle
from services.models import Cycle
from services.projects import ProjectSpec, create_project, get_project
from services.status import cycle_view
from tests.conftest import Digits
from tests.integration.api_harness import Api
from tests.integration.conftest import unique_name
from tests.integration.cycle_helpers import make_digits_project, run_stages


def test_a_failing_training_shows_its_last_error_and_attempt(
    engine: sa.Engine, settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"lease_s": 2.0})
    project = make_digits_project(engine, settings, digits, tmp_path, n_items=200, batch_size=60)
    # The first cycle is a cold start (nothing to train on); its answers give the second data.
    with db.session_scope(engine) as session:
        first = start_cycle(session, project.name, trigger="test", settings=settings).id or 0
    run_stages(engine, first, settings)
    second = maybe_start_cycle(engine, project.name, settings)  # commits the answers first
    assert second is not None and second.dataset_version is not None
    cycle_id = second.id or 0
    # The folder the trained model goes to is a file: the store cannot take the model.
    blocked = tmp_path / "store" / project.name / "models"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_bytes(b"not a folder")
    with pytest.raises(OSError, match="models"):
        run_step(engine, settings, Step(Stage.TRAIN, cycle_id))

    seen = through_the_api(engine, settings, project.name, cycle_id)
    assert seen["state"] == "training" and seen["failure_reason"] is None
    assert seen["train_attempts"] == 1
    assert seen["last_error"].startswith("train (attempt 1): "), seen["last_error"]
    assert "models" in seen["last_error"] and seen["last_error_at"] is not None

    # Once the store takes it again, the next attempt finishes; the error stays as history.
    blocked.unlink()
    time.sleep(2.5)  # the failed attempt's lease runs out (recovery would then send it again)
    following = run_step(engine, settings, Step(Stage.TRAIN, cycle_id))
    seen = through_the_api(engine, settings, project.name, cycle_id)
    assert seen["state"] != "training" and seen["train_attempts"] == 2
    assert seen["last_error"].startswith("train (attempt 1): ")
    # Finish it: a half-done cycle in the shared PostgreSQL database is work for other tests'
    # recovery passes.
    drain(engine, settings, following)
    assert through_the_api(engine, settings, project.name, cycle_id)["state"] == "done"


def through_the_api(
    engine: sa.Engine, settings: Settings, name: str, cycle_id: int
) -> dict[str, Any]:
    """The cycle as `GET /projects/{name}/cycles/{id}` shows it to a read token."""
    with TestClient(create_app(settings, engine=engine)) as client:
        api = Api(client, engine)
        answer = client.get(
            f"/api/v1/projects/{name}/cycles/{cycle_id}", headers=api.headers("read")
        )
        seen: dict[str, Any] = answer.json()
        return seen


def test_a_cycle_that_selects_nothing_says_why(
    engine: sa.Engine, settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    """Before, a new project's first cycle that selected nothing said nothing about why."""
    empty = unique_name("empty")
    with db.session_scope(engine) as session:
        create_project(
            session,
            ProjectSpec(
                name=empty,
                labels=["other", "eight"],
                modality="features",
                store_url=f"file://{tmp_path / 'empty-store'}",
            ),
        )
        cycle_id = start_cycle(session, empty, trigger="test", settings=settings).id or 0
    run_stages(engine, cycle_id, settings)
    view = cycle_of(engine, empty, cycle_id)
    assert (view["state"], view["selected"]) == ("done", 0)
    assert view["note"] == (
        "selected nothing: the pool has no unlabeled item (add some: focalloop pool add)"
    )

    spent = make_digits_project(
        engine,
        settings,
        digits,
        tmp_path / "spent",
        n_items=60,
        batch_size=10,
        label_budget=10,
        retrain_min_new_labels=10,
    )
    last = 0
    for _ in range(2):  # the second cycle trains on the budget's last labels, asks for none
        cycle = maybe_start_cycle(engine, spent.name, settings)
        assert cycle is not None
        last = cycle.id or 0
        run_stages(engine, last, settings)
    view = cycle_of(engine, spent.name, last)
    assert view["selected"] == 0 and view["note"].startswith(
        "selected nothing: the label budget (10) is spent or promised: 10 labels given"
    ), view


def cycle_of(engine: sa.Engine, name: str, cycle_id: int) -> dict[str, Any]:
    with db.session_scope(engine) as session:
        project = get_project(session, name)
        row = session.exec(
            select(Cycle).where(Cycle.project_id == project.id, Cycle.id == cycle_id)
        ).one()
        return cycle_view(session, row).to_dict()
