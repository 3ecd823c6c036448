"""focalloop as Label Studio's model backend, connected the way its users connect models (Model
settings, basic auth), against a real Label Studio: it accepts the connection, "Retrieve
predictions" and a task opened without a prediction get the hand-off's prediction under the same
model version (evaluation items an empty one), "Start training" starts a cycle; requests without
credentials are refused and the owner's token Label Studio sends to /setup is never logged."""

import logging
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from labeling.label_studio.gateway import LabelStudioGateway
from labeling.label_studio.server import LocalLabelStudio
from services import db
from services.artifacts import model_version_name
from services.config import Settings
from services.cycle.trigger import maybe_start_cycle
from services.models import Cycle, LabelTaskState
from services.projects import get_project
from tests.conftest import Digits
from tests.integration.cycle_helpers import make_digits_project, run_stages
from tests.integration.ls_harness import (
    ApiServer,
    inbox_count,
    wait_for,
)
from tests.integration.ls_project import (
    LabelStudioAdmin,
    api,
    api_port,
    broker,
    connect,
    first_cycle,
    ingest_all,
    item_of,
    ls_settings,
    project_id_of,
    project_token,
    sqlite_engine,
    tasks_of,
    true_label,
)

__all__ = [
    "api",
    "api_port",
    "broker",
    "ls_settings",
    "sqlite_engine",
]  # fixtures, used by name


def _labeled_project(
    engine: sa.Engine,
    settings: Settings,
    ls: LocalLabelStudio,
    ls_api: LabelStudioGateway,
    digits: Digits,
    folder: Path,
) -> tuple[str, int]:
    """A project whose second cycle scored the pool: open tasks carry its predictions."""
    project = make_digits_project(
        engine,
        settings,
        digits,
        folder,
        n_items=300,
        batch_size=30,
        gate={"eval_fraction": 0.1, "eval_batch_share": 0.25},
    )
    ls_project = connect(engine, project.name, ls, settings)
    first_cycle(engine, project.name, settings)
    answered = [
        task
        for task in tasks_of(engine, project.name)
        if not item_of(engine, task.item_id).eval_set
    ]
    for task in answered[:20]:
        external = item_of(engine, task.item_id).external_id
        ls_api.annotate(
            int(task.external_task_id or 0), true_label(digits, external), modality="features"
        )
    project_id = project_id_of(engine, project.name)
    wait_for(lambda: inbox_count(engine, project_id) == 20, what="20 webhooks")
    ingest_all(engine)
    second = maybe_start_cycle(engine, project.name, settings)
    assert second is not None and second.id is not None
    run_stages(engine, second.id, settings)
    return project.name, ls_project


@pytest.mark.slow
def test_label_studio_uses_focalloop_as_its_model_backend(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    ls_token: str,
    api: ApiServer,
    digits: Digits,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = sqlite_engine
    name, ls_project = _labeled_project(
        engine, ls_settings, label_studio, annotator, digits, tmp_path / "p"
    )
    with db.session_scope(engine) as session:
        project = get_project(session, name)
        scored = session.exec(
            select(Cycle).where(Cycle.project_id == project.id).order_by(col(Cycle.id).desc())
        ).first()
        assert scored is not None and scored.model_version is not None
        version = model_version_name(project, scored.model_version)
    backend = f"{api.url}/api/v1/projects/{name}/label-studio-backend"
    reader = project_token(engine, name, "read")

    # Never open: no credentials, a wrong token, or a token of another project are refused.
    assert httpx.get(f"{backend}/health").status_code == 401
    assert httpx.get(f"{backend}/health", auth=("label-studio", "wrong")).status_code == 401
    assert httpx.post(f"{backend}/predict", json={"tasks": []}).status_code == 401
    assert httpx.post(f"{backend}/webhook", json={"action": "START_TRAINING"}).status_code == 401
    other = make_digits_project(engine, ls_settings, digits, tmp_path / "other", n_items=40)
    elsewhere = project_token(engine, other.name, "admin")
    assert httpx.get(f"{backend}/health", auth=("ls", elsewhere)).status_code == 403
    assert httpx.get(f"{backend}/health", auth=("ls", reader)).status_code == 200
    # Label Studio posts JSON; a form or text body (what a cross-site page can send) is refused.
    text = httpx.post(
        f"{backend}/webhook",
        content='{"action": "START_TRAINING"}',
        headers={"Content-Type": "text/plain"},
        auth=("ls", reader),
    )
    assert text.status_code == 415

    # Added as a user adds a model: Label Studio checks /health and /setup itself.
    admin = LabelStudioAdmin(label_studio, ls_token)
    caplog.set_level(logging.DEBUG)
    ml_backend = admin.add_model_backend(engine, name, ls_project, api.url)
    assert ml_backend["model_version"] == version
    assert ls_token not in caplog.text  # /setup carried it; it is never logged

    waiting = [
        task
        for task in tasks_of(engine, name)
        if task.state == LabelTaskState.OPEN and task.model_version == version
    ]
    ordinary = next(t for t in waiting if not item_of(engine, t.item_id).eval_set)
    evaluation = next(t for t in waiting if item_of(engine, t.item_id).eval_set)
    opened = next(
        t for t in waiting if t is not ordinary and not item_of(engine, t.item_id).eval_set
    )
    ordinary_id, evaluation_id, opened_id = (
        int(t.external_task_id or 0) for t in (ordinary, evaluation, opened)
    )
    for task_id in (ordinary_id, evaluation_id, opened_id):
        admin.drop_predictions(task_id)

    # Data Manager > select > Retrieve predictions.
    retrieved = admin.call(
        "POST",
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={ls_project}",
        json={"selectedItems": {"all": False, "included": [ordinary_id, evaluation_id]}},
    )
    assert retrieved.status_code == 200, retrieved.text
    (prediction,) = annotator.task(ordinary_id)["predictions"]
    assert prediction["model_version"] == version
    assert prediction["score"] == pytest.approx(ordinary.prediction_score)
    assert prediction["result"][0]["value"]["choices"] == [ordinary.prediction_label]
    (empty,) = annotator.task(evaluation_id)["predictions"]
    assert (empty["model_version"], empty["result"]) == (version, [])
    # A task opened in the labeling screen without a prediction gets one.
    (fetched,) = annotator.task(opened_id)["predictions"]
    assert (fetched["model_version"], fetched["score"]) == (version, opened.prediction_score)

    # "Start training" in the Model settings starts a cycle; a read token may not.
    assert (
        httpx.post(
            f"{backend}/webhook", json={"action": "START_TRAINING"}, auth=("ls", reader)
        ).status_code
        == 403
    )
    trained = admin.call("POST", f"/api/ml/{ml_backend['id']}/train")
    assert trained.status_code == 200, trained.text
    with db.session_scope(engine) as session:
        started = session.exec(
            select(Cycle)
            .where(Cycle.project_id == project_id_of(engine, name))
            .order_by(col(Cycle.id).desc())
        ).first()
    assert started is not None
    assert started.trigger.startswith("label studio: Start training")
    assert ls_token not in caplog.text
