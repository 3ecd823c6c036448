"""A short fuzz of the two doors strangers and mistakes reach most: Label Studio's webhook and a
project's settings. Whatever arrives, the answer is never a 5xx, and a refused request writes
nothing (no inbox event; the project's row unchanged, no audit entry)."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlmodel import func, select

from services import db
from services.api.app import create_app
from services.config import Settings
from services.models import AuditEntry, InboxEvent, Project
from services.projects import ProjectSpec, create_project
from tests.integration.api_harness import Api
from tests.integration.conftest import free_port, unique_name

SECRET = "fuzz-secret"
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# JSON of every kind, nested a little, with the values parsers trip on.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["0001-01-01T00:30:00+01:00", "9999-12-31T23:59:59-01:00", "", "Z"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Label Studio's shape with any field replaced by anything.
annotations = st.fixed_dictionaries(
    {
        "id": st.one_of(st.integers(min_value=-5, max_value=2**64), json_values),
        "task": st.one_of(st.integers(min_value=0, max_value=2**64), json_values),
        "result": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "type": st.sampled_from(["choices", "labels", "x"]),
                        "value": st.one_of(
                            st.fixed_dictionaries({"choices": st.lists(json_values, max_size=2)}),
                            json_values,
                        ),
                    }
                ),
                max_size=2,
            ),
            json_values,
        ),
        "updated_at": st.one_of(st.datetimes().map(lambda d: d.isoformat() + "Z"), json_values),
        "was_cancelled": json_values,
    }
)
webhook_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "action": st.sampled_from(
                ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "OTHER"]
            ),
            "annotation": st.one_of(annotations, json_values),
            "annotations": st.one_of(st.lists(annotations, max_size=2), json_values),
            "task": json_values,
        }
    ),
)
settings_changes = st.dictionaries(
    st.sampled_from(
        [
            "labels",
            "loss",
            "selection",
            "batch_size",
            "label_budget",
            "retrain_min_new_labels",
            "retrain_cron",
            "gate",
            "seed",
            "unknown",
        ]
    ),
    st.one_of(
        json_values,
        st.fixed_dictionaries({"gamma": json_values, "alpha": json_values, "kind": json_values}),
        st.sampled_from(["a b c d e", "99 99 * * *", "*/5 * * * *", "0 3 * * mon"]),
    ),
    max_size=4,
)


@pytest.fixture
def door(engine: sa.Engine, settings: Settings, tmp_path: Path) -> Iterator[tuple[Api, str]]:
    name = unique_name("fuzz")
    with db.session_scope(engine) as session:
        create_project(
            session,
            ProjectSpec(
                name=name,
                labels=["other", "eight"],
                modality="features",
                store_url=f"file://{tmp_path / 'store'}",
            ),
        )
    settings = settings.model_copy(
        update={
            "webhook_secret": SecretStr(SECRET),
            "broker_url": f"redis://127.0.0.1:{free_port()}/0",  # ingest is not the subject
        }
    )
    with TestClient(create_app(settings, engine=engine)) as client:
        yield Api(client, engine), name


def count(engine: sa.Engine, table: type[InboxEvent] | type[AuditEntry]) -> int:
    with db.session_scope(engine) as session:
        return int(session.exec(select(func.count()).select_from(table)).one())


@pytest.mark.timeout(300)
def test_the_webhook_never_answers_5xx_and_a_refusal_stores_nothing(
    door: tuple[Api, str], engine: sa.Engine
) -> None:
    api, name = door

    @FUZZ
    @given(body=webhook_bodies)
    def deliver(body: Any) -> None:
        before = count(engine, InboxEvent)
        answer = api.client.post(
            f"/api/v1/webhooks/label-studio?project={name}",
            headers={"X-Focalloop-Secret": SECRET, "Content-Type": "application/json"},
            content=json.dumps(body),
        )
        assert answer.status_code < 500, (answer.status_code, answer.text[:300])
        if answer.status_code != 200:
            assert count(engine, InboxEvent) == before, answer.text[:300]
        assert len(answer.text) < 2000  # a reason, never the body echoed

    deliver()


@pytest.mark.timeout(300)
def test_settings_never_answer_5xx_and_a_refusal_changes_nothing(
    door: tuple[Api, str], engine: sa.Engine
) -> None:
    api, name = door
    headers = api.headers("write")

    def row() -> dict[str, Any]:
        with db.session_scope(engine) as session:
            project = session.exec(select(Project).where(Project.name == name)).one()
            return project.model_dump(exclude={"updated_at"})

    @FUZZ
    @given(changes=settings_changes)
    def patch(changes: dict[str, Any]) -> None:
        before, audits = row(), count(engine, AuditEntry)
        answer = api.client.patch(f"/api/v1/projects/{name}", headers=headers, json=changes)
        assert answer.status_code < 500, (changes, answer.status_code, answer.text[:300])
        if answer.status_code != 200:
            assert row() == before, (changes, answer.text[:300])
            assert count(engine, AuditEntry) == audits

    patch()
