"""Concurrent changes to one project through a real uvicorn server, on SQLite and PostgreSQL:
every change acknowledged with 200 is kept, and one that cannot be applied on top of another
(two different classes appended to the same label set) is refused, never silently dropped.
On SQLite, a change once read the project outside any write lock and wrote it back, so of 20
concurrent PATCHes to different settings about 12 were lost while all answered 200."""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import select

from services import db
from services.api.app import create_app
from services.auth import create_token
from services.config import Settings
from services.models import AuditEntry
from tests.integration.conftest import free_port, unique_name
from tests.integration.ls_harness import ApiServer, api_server

# One change per setting, each to a value no default has.
CHANGES: list[dict[str, Any]] = [
    {"batch_size": 37},
    {"label_budget": 4321},
    {"retrain_min_new_labels": 77},
    {"retrain_cron": "7 */5 * * *"},
    {"seed": 99},
    {"loss": {"gamma": 1.25}},
    {"loss": {"beta": 0.99}},
    {"loss": {"prior_bias": True}},
    {"loss": {"alpha": "inverse_frequency"}},
    {"selection": {"oversample": 7}},
    {"selection": {"quota_min_share": 0.3}},
    {"selection": {"rare_share": 0.4}},
    {"selection": {"explore_share": 0.2}},
    {"selection": {"cold_start": "random"}},
    {"selection": {"strategy": "margin"}},
    {"gate": {"eval_fraction": 0.04}},
    {"gate": {"eval_cap": 1234}},
    {"gate": {"eval_batch_share": 0.3}},
    {"gate": {"recall_tolerance": 0.07}},
    {"gate": {"macro_f1_tolerance": 0.03}},
]


@pytest.fixture
def server(engine: sa.Engine, settings: Settings) -> Iterator[ApiServer]:
    settings = settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"}  # nothing is enqueued
    )
    yield from api_server(lambda: create_app(settings, engine=engine), free_port())


def write_headers(engine: sa.Engine) -> dict[str, str]:
    with db.session_scope(engine) as session:
        _, secret = create_token(session, name="concurrent", scope="write", actor="test")
    return {"Authorization": f"Bearer {secret}"}


def _shown(project: dict[str, Any], change: dict[str, Any]) -> bool:
    """Whether the project as GET shows it carries `change`."""
    ((key, value),) = change.items()
    if isinstance(value, dict):
        ((inner, wanted),) = value.items()
        return bool(project[key][inner] == wanted)
    return bool(project[key] == value)


def test_concurrent_changes_to_different_settings_are_all_kept(
    server: ApiServer, engine: sa.Engine
) -> None:
    write = write_headers(engine)
    name = unique_name("concurrent")
    created = httpx.post(
        f"{server.url}/api/v1/projects",
        headers=write,
        json={"name": name, "labels": ["other", "eight"], "modality": "features"},
    )
    assert created.status_code == 201, created.text
    with ThreadPoolExecutor(len(CHANGES)) as pool:
        answers = list(
            pool.map(
                lambda change: httpx.patch(
                    f"{server.url}/api/v1/projects/{name}", headers=write, json=change, timeout=60
                ),
                CHANGES,
            )
        )
    assert {a.status_code for a in answers} <= {200, 409}, [
        a.text for a in answers if a.status_code != 200
    ]
    kept = [c for c, a in zip(CHANGES, answers, strict=True) if a.status_code == 200]
    final = httpx.get(f"{server.url}/api/v1/projects/{name}", headers=write).json()
    lost = [change for change in kept if not _shown(final, change)]
    assert not lost, f"{len(lost)} of {len(kept)} acknowledged changes lost: {lost}"
    with db.session_scope(engine) as session:
        audited = session.exec(
            select(AuditEntry.detail).where(
                AuditEntry.action == "project.update", AuditEntry.target == name
            )
        ).all()
    assert sorted(map(str, audited)) == sorted(map(str, kept))


def test_concurrent_label_additions_never_lose_an_acknowledged_class(
    server: ApiServer, engine: sa.Engine
) -> None:
    write = write_headers(engine)
    name = unique_name("labels")
    base = ["other", "eight"]
    created = httpx.post(
        f"{server.url}/api/v1/projects",
        headers=write,
        json={"name": name, "labels": base, "modality": "features"},
    )
    assert created.status_code == 201, created.text
    additions = [f"class-{i}" for i in range(10)]
    with ThreadPoolExecutor(len(additions)) as pool:
        answers = list(
            pool.map(
                lambda extra: httpx.patch(
                    f"{server.url}/api/v1/projects/{name}",
                    headers=write,
                    json={"labels": [*base, extra]},
                    timeout=60,
                ),
                additions,
            )
        )
    accepted = [x for x, a in zip(additions, answers, strict=True) if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    # Each request names the whole new set: once one class is appended, every other request
    # would remove it, which the add-only rule refuses (422), so exactly one is kept.
    assert all(a.status_code == 422 and "cannot remove" in a.text for a in refused)
    final = httpx.get(f"{server.url}/api/v1/projects/{name}", headers=write).json()
    assert len(accepted) == 1
    assert final["labels"] == [*base, *accepted]
