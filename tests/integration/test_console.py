"""The console over HTTP on a project with real models (the browser test, tests/browser/
test_console.py, walks the same pages in Chromium): who may see and do what, the same-origin
rule on every state-changing request, the actions and their audit entries, the data the pages
are drawn from, and offline API docs."""

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import col, func, select

from services import db
from services.api.app import create_app
from services.api.console.auth import COOKIE
from services.api.docs import REDOC_JS, REMOTE_LOGO
from services.auth import create_token
from services.config import Settings, child_environment
from services.models import AuditEntry, Cycle, CycleState, ModelVersion, Project, Promotion, utcnow
from services.projects import ProjectSpec, create_project
from services.tuning.study import storage_exists
from tests.conftest import Digits
from tests.integration.conftest import PrivateRedis, free_port, insert_row
from tests.integration.cycle_helpers import project_with_models

pytestmark = pytest.mark.timeout(120)
ORIGIN = "http://testserver"  # TestClient's Host
SAME = {"Origin": ORIGIN, "Sec-Fetch-Site": "same-origin"}


@dataclass(frozen=True)
class Deployment:
    engine: sa.Engine
    settings: Settings
    project: str
    other: str


@pytest.fixture(scope="module")
def deployment(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("console")
    settings = Settings(
        data_dir=folder / "data",
        broker_url=f"redis://127.0.0.1:{free_port()}/0",  # nobody listens
        pool_shard_items=200,
    )
    engine = db.make_engine(f"sqlite:///{folder / 'state.db'}")
    db.upgrade(engine)
    project = project_with_models(engine, settings, digits, folder / "project", cycles=4)
    with db.session_scope(engine) as session:
        other = create_project(
            session,
            ProjectSpec(
                name="console-other",
                labels=["a", "b"],
                modality="features",
                store_url=f"file://{folder / 'other'}",
            ),
        )
    yield Deployment(engine, settings, project.name, other.name)
    engine.dispose()


def _token(engine: sa.Engine, scope: str, *, project: str | None = None, name: str = "t") -> str:
    with db.session_scope(engine) as session:
        _, secret = create_token(session, name=name, scope=scope, actor="test", project=project)
    return secret


def _client(deployment: Deployment, settings: Settings | None = None) -> TestClient:
    return TestClient(create_app(settings or deployment.settings, engine=deployment.engine))


def _signed_in(client: TestClient, token: str) -> TestClient:
    answer = client.post("/console/sign-in", data={"token": token}, headers=SAME)
    assert answer.status_code == 200, answer.text  # followed to the projects page
    return client


def _audit(engine: sa.Engine, action: str) -> list[tuple[str, str]]:
    with db.session_scope(engine) as session:
        return [
            (actor, target)
            for actor, target in session.exec(
                select(AuditEntry.actor, AuditEntry.target)
                .where(AuditEntry.action == action)
                .order_by(col(AuditEntry.id))
            ).all()
        ]


def test_signing_in_keeps_the_token_in_the_consoles_own_cookie_only(
    deployment: Deployment,
) -> None:
    token = _token(deployment.engine, "read")
    with _client(deployment) as client:
        assert client.get("/", follow_redirects=False).headers["location"] == "/console/"
        page = client.get("/console/", follow_redirects=False)
        assert (page.status_code, page.headers["location"]) == (303, "/console/sign-in")
        assert client.get("/console/data/projects").status_code == 401

        wrong = client.post("/console/sign-in", data={"token": "flt_wrong"}, headers=SAME)
        assert wrong.status_code == 401 and "unknown, revoked or expired" in wrong.text
        assert "set-cookie" not in wrong.headers and COOKIE not in client.cookies

        right = client.post(
            "/console/sign-in", data={"token": token}, headers=SAME, follow_redirects=False
        )
        assert (right.status_code, right.headers["location"]) == (303, "/console/")
        cookie = right.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}={token};")
        for attribute in ("HttpOnly", "Path=/console", "SameSite=strict", "Max-Age=43200"):
            assert attribute in cookie
        listed = client.get("/console/")
        assert listed.status_code == 200 and deployment.project in listed.text
        assert token not in listed.text  # never echoed into a page
        policy = listed.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy
        # The REST API does not take the cookie in place of a bearer token.
        assert client.get("/api/v1/projects").status_code == 401

        out = client.post("/console/sign-out", headers=SAME, follow_redirects=False)
        assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]


@pytest.mark.parametrize(
    "headers",
    [
        {},  # no browser page sent it
        {"Origin": "http://127.0.0.1:9"},  # a page on another port
        {"Origin": ORIGIN, "Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:9", "Sec-Fetch-Site": "same-origin"},
    ],
)
def test_state_changing_requests_from_anywhere_but_our_pages_change_nothing(
    deployment: Deployment, headers: dict[str, str]
) -> None:
    token = _token(deployment.engine, "write")
    with _client(deployment) as client:
        _signed_in(client, token)
        before = len(_audit(deployment.engine, "project.pause"))
        answer = client.post(
            f"/console/projects/{deployment.project}/actions/pause", headers=headers
        )
        assert answer.status_code == 403
        assert "did not come from a page of this console" in answer.text
        assert (
            client.post("/console/sign-in", data={"token": token}, headers=headers).status_code
            == 403
        )
    assert len(_audit(deployment.engine, "project.pause")) == before
    with db.session_scope(deployment.engine) as session:
        assert not session.exec(
            select(Project.paused).where(Project.name == deployment.project)
        ).one()


def test_read_and_project_restricted_tokens_see_only_what_they_may(
    deployment: Deployment,
) -> None:
    with _client(deployment) as client:
        _signed_in(client, _token(deployment.engine, "read"))
        page = client.get(f"/console/projects/{deployment.project}")
        assert page.status_code == 200
        assert 'id="actions"' not in page.text and "/confirm/" not in page.text
        refused = client.post(f"/console/projects/{deployment.project}/actions/pause", headers=SAME)
        assert refused.status_code == 403 and "write scope" in refused.text
        assert (
            client.get(f"/console/projects/{deployment.project}/confirm/pause").status_code == 403
        )

    with _client(deployment) as client:
        _signed_in(client, _token(deployment.engine, "write", project=deployment.other))
        listed = client.get("/console/data/projects").json()
        assert [g["name"] for g in listed] == [deployment.other]
        assert client.get(f"/console/projects/{deployment.project}").status_code == 403
        assert client.get(f"/console/data/projects/{deployment.project}/live").status_code == 403
        assert (
            client.post(
                f"/console/projects/{deployment.project}/actions/pause", headers=SAME
            ).status_code
            == 403
        )
        for path in (
            f"/console/data/projects/{deployment.project}/curve",
            f"/console/projects/{deployment.project}/tuning/any-study/heatmaps.png",
            f"/console/projects/{deployment.project}/confirm/pause",
            # A name that does not exist is refused alike: no telling which names do.
            "/console/projects/no-such-project",
        ):
            assert client.get(path).status_code == 403, path

    with _client(deployment) as client:
        _signed_in(client, _token(deployment.engine, "write"))
        assert client.get("/console/projects/no-such-project").status_code == 404
        assert client.get("/console/projects/no-such-project/confirm/pause").status_code == 404
        # No tuning study was ever stored: a 404, and reading made no storage either.
        heatmaps = f"/console/projects/{deployment.project}/tuning/any-study/heatmaps.png"
        assert client.get(heatmaps).status_code == 404
        assert not storage_exists(deployment.engine)


def test_actions_are_the_apis_own_and_audited_alike(deployment: Deployment) -> None:
    token = _token(deployment.engine, "write", name="console-writer")
    with db.session_scope(deployment.engine) as session:
        project = session.exec(select(Project).where(Project.name == deployment.project)).one()
        versions = dict(
            session.exec(
                select(ModelVersion.version, ModelVersion.promotion).where(
                    ModelVersion.project_id == project.id
                )
            ).all()
        )
    current = next(v for v, p in versions.items() if p == Promotion.CURRENT)
    earlier = min(versions)
    base = f"/console/projects/{deployment.project}"
    with _client(deployment) as client:
        _signed_in(client, token)
        confirm = client.get(f"{base}/confirm/rollback", params={"target": earlier})
        assert confirm.status_code == 200
        assert f'action="{base}/actions/rollback"' in confirm.text
        assert f'name="target" value="{earlier}"' in confirm.text
        done = client.post(f"{base}/actions/rollback", data={"target": earlier}, headers=SAME)
        assert done.status_code == 200 and "Done: Roll back to this model." in done.text
        back = client.post(f"{base}/actions/promote", data={"target": current}, headers=SAME)
        assert back.status_code == 200 and "Done: Promote this model." in back.text

        # Refusals render a page that says why and change nothing.
        missing = client.post(f"{base}/actions/promote", data={"target": 999}, headers=SAME)
        assert missing.status_code == 404 and "no model version 999" in missing.text
        assert (
            client.post(f"{base}/actions/promote", data={"target": "x"}, headers=SAME).status_code
            == 422
        )
        assert client.post(f"{base}/actions/explode", headers=SAME).status_code == 404
        nothing_running = client.post(
            f"{base}/actions/cancel-cycle", data={"target": 1}, headers=SAME
        )
        assert nothing_running.status_code == 409 and "already ended" in nothing_running.text
        with db.session_scope(deployment.engine) as session:
            cycles_before = session.exec(select(func.count()).select_from(Cycle)).one()
        no_broker = client.post(f"{base}/actions/start-cycle", headers=SAME)
        assert no_broker.status_code == 503 and "broker" in no_broker.text
        with db.session_scope(deployment.engine) as session:
            assert session.exec(select(func.count()).select_from(Cycle)).one() == cycles_before

    writer = [
        (a, t) for a, t in _audit(deployment.engine, "model.rollback") if "console-writer" in a
    ]
    assert [t for _, t in writer] == [f"model:m{earlier}"]
    promoted = [
        (a, t) for a, t in _audit(deployment.engine, "model.promote") if "console-writer" in a
    ]
    assert [t for _, t in promoted] == [f"model:m{current}"]
    with db.session_scope(deployment.engine) as session:
        assert (
            session.exec(
                select(ModelVersion.promotion).where(
                    ModelVersion.project_id == project.id, ModelVersion.version == current
                )
            ).one()
            == Promotion.CURRENT
        )


def test_a_cycle_started_from_the_console_reaches_the_broker(
    deployment: Deployment, private_redis: PrivateRedis
) -> None:
    settings = deployment.settings.model_copy(update={"broker_url": private_redis.url})
    with _client(deployment, settings) as client:
        _signed_in(client, _token(deployment.engine, "write", name="starter"))
        started = client.post(
            f"/console/projects/{deployment.project}/actions/start-cycle", headers=SAME
        )
        assert started.status_code == 200 and "Done: Start a cycle." in started.text
        live = client.get(f"/console/data/projects/{deployment.project}/live").json()
        assert live["cycle"]["state"] == "pending" and live["cycle"]["active"]
        assert redis.Redis.from_url(private_redis.url).llen("gpu") == 1  # the training message
        cancelled = client.post(
            f"/console/projects/{deployment.project}/actions/cancel-cycle",
            data={"target": live["cycle"]["id"]},
            headers=SAME,
        )
        assert cancelled.status_code == 200
    (entry,) = [t for a, t in _audit(deployment.engine, "cycle.start") if a.endswith(":starter")]
    assert entry == f"cycle:{live['cycle']['id']}"


def test_the_pages_data_one_point_per_model_with_intervals(deployment: Deployment) -> None:
    with _client(deployment) as client:
        _signed_in(client, _token(deployment.engine, "read"))
        curve = client.get(f"/console/data/projects/{deployment.project}/curve").json()
        page = client.get(f"/console/projects/{deployment.project}").text
    with db.session_scope(deployment.engine) as session:
        project = session.exec(select(Project).where(Project.name == deployment.project)).one()
        models = session.exec(
            select(ModelVersion)
            .where(ModelVersion.project_id == project.id)
            .order_by(col(ModelVersion.version))
        ).all()
    assert [p["version"] for p in curve] == [m.version for m in models]
    drawn = re.findall(
        r'<circle class="point[^"]*"[^>]*data-series="macro-F1" data-version="(\d+)"', page
    )
    assert sorted(map(int, drawn)) == [m.version for m in models]
    judged = [p for p in curve if p["macro_f1"] is not None]
    assert judged, "no model was judged on held-out items"
    for point in judged:
        assert len(point["classes"]) == 2
        for row in point["classes"]:
            low, high = row["recall_interval"]
            assert 0.0 <= low <= row["recall"] <= high <= 1.0
            assert row["support"] > 0
        assert point["evaluated_on"] == "evaluation set"


def test_the_api_docs_load_only_from_this_server(deployment: Deployment) -> None:
    with _client(deployment) as client:
        for path in ("/docs", "/redoc"):
            page = client.get(path)
            assert page.status_code == 200
            sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
            assert sources and all(s.startswith("/") for s in sources), sources
        bundle = client.get(REDOC_JS)
        assert bundle.status_code == 200 and REMOTE_LOGO not in bundle.content
        assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_cycle_status_watch_follows_a_project_until_ctrl_c(
    deployment: Deployment, tmp_path: Path
) -> None:
    settings = deployment.settings.model_copy(
        update={"database_url": deployment.engine.url.render_as_string(hide_password=False)}
    )
    output = tmp_path / "watch.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "cycle",
                "status",
                deployment.project,
                "--watch",
            ],
            env=child_environment(settings),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:

        def printed(text: str) -> bool:
            deadline = time.monotonic() + 60
            while text not in output.read_text(errors="replace"):
                assert process.poll() is None, output.read_text(errors="replace")
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.2)
            return True

        assert printed(f"{deployment.project} · cycle #"), output.read_text()
        with db.session_scope(deployment.engine) as session:
            project = session.exec(select(Project).where(Project.name == deployment.project)).one()
            number = 1 + max(
                session.exec(select(Cycle.number).where(Cycle.project_id == project.id)).all()
            )
            now = utcnow()
            session.add(
                Cycle(
                    project_id=project.id or 0,
                    number=number,
                    state=CycleState.TRAINING,
                    trigger="written by the test",
                    progress={
                        "epoch": 7, "epochs": 50, "train_loss": 0.125, "val_loss": None,
                        "started_at": now.isoformat(), "at": now.isoformat(),
                    },
                )
            )  # fmt: skip
        assert printed(f"cycle #{number} training: epoch 7 of at most 50, loss 0.1250"), (
            output.read_text()
        )
        # The REST API reports the same progress.
        with _client(deployment) as client:
            token = _token(deployment.engine, "read")
            (newest,) = client.get(
                f"/api/v1/projects/{deployment.project}/cycles",
                params={"limit": 1},
                headers={"Authorization": f"Bearer {token}"},
            ).json()
        assert (newest["number"], newest["progress"]["epoch"], newest["progress"]["epochs"]) == (
            number, 7, 50,
        )  # fmt: skip
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        with db.session_scope(deployment.engine) as session:
            for row in session.exec(select(Cycle).where(Cycle.trigger == "written by the test")):
                row.state = CycleState.CANCELLED
                session.add(row)


def _drawn(page: str) -> dict[int, str]:
    """Model version -> the promotion class of its macro-F1 marker on the project page."""
    return {
        int(version): kind
        for kind, version in re.findall(
            r'<circle class="point (promotion-\w+)[^"]*"[^>]*data-series="macro-F1" '
            r'data-version="(\d+)"',
            page,
        )
    }


def test_the_learning_curve_follows_every_change_to_the_models(deployment: Deployment) -> None:
    """The curve and its charts are kept between views (services/api/console/curve_cache.py):
    a model recorded, its decision rewritten or a model removed shows on the next view."""
    page_url = f"/console/projects/{deployment.project}"
    curve_url = f"/console/data/projects/{deployment.project}/curve"
    with db.session_scope(deployment.engine) as session:
        newest = session.exec(
            select(ModelVersion)
            .join(Project, col(Project.id) == col(ModelVersion.project_id))
            .where(Project.name == deployment.project)
            .order_by(col(ModelVersion.version).desc())
            .limit(1)
        ).one()
        added = ModelVersion(
            **newest.model_dump(exclude={"id", "version", "promotion", "promotion_reason"}),
            version=newest.version + 1,
            promotion=Promotion.REJECTED,
            promotion_reason="rejected by this test",
        )
    with _client(deployment) as client:
        _signed_in(client, _token(deployment.engine, "read"))
        before = _drawn(client.get(page_url).text)
        assert before and _drawn(client.get(page_url).text) == before  # a cached view alike
        try:
            insert_row(deployment.engine, added)
            page = client.get(page_url).text
            assert _drawn(page) == before | {added.version: "promotion-rejected"}
            assert "rejected by this test" in page
            assert [p["version"] for p in client.get(curve_url).json()][-1] == added.version
            with db.session_scope(deployment.engine) as session:
                row = session.get(ModelVersion, added.id)
                assert row is not None
                row.promotion_reason = "reason rewritten by this test"
            page = client.get(page_url).text
            assert "reason rewritten by this test" in page and "rejected by this test" not in page
        finally:
            with db.session_scope(deployment.engine) as session:
                row = session.get(ModelVersion, added.id)
                if row is not None:
                    session.delete(row)
        assert _drawn(client.get(page_url).text) == before
        assert added.version not in [p["version"] for p in client.get(curve_url).json()]
