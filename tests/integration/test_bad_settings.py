"""Project settings that would break the loop are refused when they are set (422 with the
reason, nothing changed), on SQLite and PostgreSQL; null unsets what may be unset. Each case
below was once saved (or answered 500) and only failed later: at every beat tick, in training,
or in the database."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import col, select

from services import db
from services.api.app import create_app
from services.config import Settings
from services.cycle.trigger import cron_due
from services.errors import InvalidInput
from services.models import AuditEntry, Project, utcnow
from services.projects import update_project
from tests.integration.api_harness import Api
from tests.integration.conftest import free_port, unique_name


@pytest.fixture
def api(engine: sa.Engine, settings: Settings) -> Iterator[Api]:
    settings = settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"}  # nothing is enqueued
    )
    with TestClient(create_app(settings, engine=engine)) as client:
        yield Api(client, engine)


def new_project(api: Api, tmp_path: Path, **settings: Any) -> str:
    name = unique_name("settings")
    answer = api.client.post(
        "/api/v1/projects",
        headers=api.headers("write"),
        json={
            "name": name,
            "labels": ["other", "eight"],
            "modality": "features",
        }
        | settings,
    )
    assert answer.status_code == 201, answer.text
    return name


BAD_UPDATES: dict[str, dict[str, Any]] = {
    "a budget past 32 bits": {"label_budget": 2**31},
    "a threshold past 64 bits": {"retrain_min_new_labels": 2**63 + 1},
    "a cron of letters": {"retrain_cron": "a b c d e"},
    "a cron out of range": {"retrain_cron": "99 99 * * *"},
    "a cron on 31 February": {"retrain_cron": "0 0 31 2 *"},
    "a cron with step 0": {"retrain_cron": "*/0 * * * *"},
    "gamma 1e308": {"loss": {"gamma": 1e308}},
    "a per-class gamma of 1e9": {"loss": {"gamma": [1.0, 1e9]}},
    "an unknown loss kind": {"loss": {"kind": "hinge"}},
    "alpha all zero": {"loss": {"alpha": [0.0, 0.0]}},
    "beta 1": {"loss": {"beta": 1.0}},
    "oversample 10**12": {"selection": {"oversample": 10**12}},
    "oversample true": {"selection": {"oversample": True}},
    "an evaluation cap past 64 bits": {"gate": {"eval_cap": 10**20}},
    "recall targets as a list": {"gate": {"recall_targets": [0.9]}},
    "a null batch size": {"batch_size": None},
    "a null seed": {"seed": None},
}


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_a_setting_that_would_break_the_loop_is_refused_and_nothing_changes(
    api: Api, engine: sa.Engine, tmp_path: Path, case: str
) -> None:
    name = new_project(api, tmp_path, label_budget=500, retrain_cron="0 */6 * * *")
    write = api.headers("write")
    before = api.client.get(f"/api/v1/projects/{name}", headers=write).json()
    answer = api.client.patch(f"/api/v1/projects/{name}", headers=write, json=BAD_UPDATES[case])
    assert answer.status_code == 422, answer.text
    assert len(answer.text) < 2000
    assert api.client.get(f"/api/v1/projects/{name}", headers=write).json() == before
    with db.session_scope(engine) as session:
        assert not session.exec(
            select(AuditEntry).where(
                AuditEntry.action == "project.update", AuditEntry.target == name
            )
        ).all()


@pytest.mark.parametrize(
    "create",
    [{"label_budget": 2**31}, {"retrain_min_new_labels": 2**40}, {"retrain_cron": "0 0 30 2 *"}],
)
def test_a_project_with_such_settings_is_not_created(
    api: Api, engine: sa.Engine, tmp_path: Path, create: dict[str, Any]
) -> None:
    name = unique_name("settings")
    answer = api.client.post(
        "/api/v1/projects",
        headers=api.headers("write"),
        json={
            "name": name,
            "labels": ["other", "eight"],
            "modality": "features",
        }
        | create,
    )
    assert answer.status_code == 422, answer.text
    with db.session_scope(engine) as session:
        assert not session.exec(select(Project).where(Project.name == name)).all()


def test_null_unsets_the_budget_and_the_cron_and_is_audited(
    api: Api, engine: sa.Engine, tmp_path: Path
) -> None:
    name = new_project(api, tmp_path, label_budget=500, retrain_cron="0 */6 * * *")
    write = api.headers("write")
    answer = api.client.patch(
        f"/api/v1/projects/{name}",
        headers=write,
        json={"retrain_cron": None, "label_budget": None, "batch_size": 30},
    )
    assert answer.status_code == 200, answer.text
    shown = answer.json()
    assert (shown["retrain_cron"], shown["label_budget"], shown["batch_size"]) == (None, None, 30)
    with db.session_scope(engine) as session:
        (detail,) = session.exec(
            select(AuditEntry.detail).where(
                AuditEntry.action == "project.update", AuditEntry.target == name
            )
        ).all()
    assert detail == {"retrain_cron": None, "label_budget": None, "batch_size": 30}
    # Leaving a field out keeps it.
    kept = api.client.patch(f"/api/v1/projects/{name}", headers=write, json={"batch_size": 40})
    assert (kept.json()["batch_size"], kept.json()["label_budget"]) == (40, None)


def test_the_command_line_path_checks_the_same_and_unsets_by_name(
    api: Api, engine: sa.Engine, tmp_path: Path
) -> None:
    name = new_project(api, tmp_path, label_budget=500, retrain_cron="0 */6 * * *")
    with db.session_scope(engine) as session:
        for bad in ({"retrain_cron": "0 0 31 2 *"}, {"label_budget": 2**31}):
            with pytest.raises(InvalidInput):
                update_project(session, name, **bad)
        with pytest.raises(InvalidInput, match="both given and unset"):
            update_project(session, name, label_budget=9, clear={"label_budget"})
        with pytest.raises(InvalidInput, match="can be unset"):
            update_project(session, name, clear={"batch_size"})
    with db.session_scope(engine) as session:
        project = update_project(session, name, clear={"retrain_cron"})
        assert (project.retrain_cron, project.label_budget) == (None, 500)


def test_a_cron_saved_before_these_checks_is_ignored_with_a_warning_not_an_error(
    api: Api, engine: sa.Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = new_project(api, tmp_path)
    with db.session_scope(engine) as session:
        session.execute(
            sa.update(Project)
            .where(col(Project.name) == name)
            .values(retrain_cron="99 99 * * *")  # what an older version let through
        )
    with db.session_scope(engine) as session:
        project = session.exec(select(Project).where(Project.name == name)).one()
        assert cron_due(project, utcnow(), utcnow()) is False
    assert "retrain cron ignored" in caplog.text
