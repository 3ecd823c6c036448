"""Tuning through the API, its trials run by a real Celery worker: start a study, watch it, read
its results and heatmaps, apply the best setting; a second study is refused while one runs; bad
input is a 4xx that records nothing."""

# The worker fixtures are imported from test_workers (pytest finds them by name), so the test's
# parameters shadow the imports by design.
# ruff: noqa: F811

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import select

from services import db
from services.api.app import create_app
from services.config import Settings
from services.models import AuditEntry
from services.projects import get_project
from services.tuning.studies import list_studies
from tests.conftest import Digits
from tests.integration.api_harness import Api
from tests.integration.test_tune import labeled_project
from tests.integration.test_workers import (  # noqa: F401 (fixtures, found by name)
    Cluster,
    cluster,
    database_url,
    state,
    worker_settings,
)

pytestmark = pytest.mark.timeout(300)
SMALL = {"gammas": [0.0], "folds": 2, "repeats": 1}


def test_a_study_is_started_watched_read_and_applied_through_the_api(
    state: sa.Engine,
    worker_settings: Settings,
    cluster: Callable[..., Cluster],
    digits: Digits,
    tmp_path: Path,
) -> None:
    name = labeled_project(state, worker_settings, digits, tmp_path / "p")
    base = f"/api/v1/projects/{name}/tuning"
    with TestClient(create_app(worker_settings, engine=state)) as client:
        api = Api(client, state)
        write, read = api.headers("write"), api.headers("read")
        for body, status, message in [
            ({"metric": "recall:cat"}, 422, "no class 'cat'"),
            ({"gammas": [-1.0]}, 422, "gamma must be in [0, 5]"),
            ({"folds": 11}, 422, "every class needs at least 11 labels"),
            ({"mode": "anneal"}, 422, "mode"),
            ({"trials": 0}, 422, "trials"),
            ({"alpha": 0.25}, 422, "alpha"),
        ]:
            answer = client.post(base, headers=write, json=body)
            assert answer.status_code == status, (body, answer.text)
            assert message in answer.text, (body, answer.text)
        assert client.post(base, headers=read, json=SMALL).status_code == 403
        assert (
            client.post("/api/v1/projects/nope/tuning", headers=write, json=SMALL).status_code
            == 404
        )
        assert list_studies(state, name) == []  # nothing recorded by a refused request

        started = client.post(base, headers=write, json=SMALL)
        assert started.status_code == 202, started.text
        study = started.json()
        assert (study["state"], study["total"], study["mode"]) == ("running", 3, "grid")
        again = client.post(base, headers=write, json=SMALL)
        assert again.status_code == 409 and "still running" in again.text
        early = client.get(f"{base}/{study['name']}/results", headers=read)
        assert early.status_code == 409 and "no results yet" in early.text

        cluster().worker(concurrency=2)
        deadline = time.monotonic() + 180
        while (now := client.get(f"{base}/{study['name']}", headers=read).json())[
            "state"
        ] == "running":
            assert time.monotonic() < deadline, now
            time.sleep(0.5)
        assert (now["state"], now["done"], now["failed"]) == ("complete", 3, 0)
        listed = client.get(base, headers=read).json()
        assert [s["name"] for s in listed] == [study["name"]]

        figures = client.get(f"{base}/{study['name']}/results", headers=read).json()
        assert len(figures["heatmap"]["cells"]) == 3 and figures["minority_class"] == "eight"
        png = client.get(f"{base}/{study['name']}/heatmaps.png", headers=read)
        assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
        assert client.get(f"{base}/missing", headers=read).status_code == 404

        # The console shows the study and draws its heatmaps (signed in with the same token).
        origin = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
        token = read["Authorization"].removeprefix("Bearer ")
        assert client.post("/console/sign-in", data={"token": token}, headers=origin).is_success
        page = client.get(f"/console/projects/{name}").text
        heatmaps = f"/console/projects/{name}/tuning/{study['name']}/heatmaps.png"
        assert f"{study['name']}: complete (3 of 3 trials" in page and f'src="{heatmaps}"' in page
        assert client.get(heatmaps).content == png.content
        client.cookies.clear()

        applied = client.post(f"{base}/{study['name']}/apply", headers=write)
        assert applied.status_code == 200, applied.text
        best = figures["best"]
        assert applied.json()["loss"]["gamma"] == best["gamma"]
    with db.session_scope(state) as session:
        assert get_project(session, name).loss_config == applied.json()["loss"]
        actions = [
            entry.action
            for entry in session.exec(select(AuditEntry).order_by(sa.column("id"))).all()
        ]
    assert actions[-2:] == ["tuning.start", "project.tune"]
