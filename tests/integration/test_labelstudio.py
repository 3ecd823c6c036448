"""The Label Studio round trip against a real Label Studio server and our API under a real
uvicorn server: hand-off, webhooks, sync after downtime, deletions, rejected labels, reviews,
media links."""

import asyncio
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import col, select
from starlette.types import ASGIApp, Receive, Scope, Send

from labeling.label_studio import hand_off as ls_hand_off
from labeling.label_studio import link, sync
from labeling.label_studio import tasks as ls_tasks
from labeling.label_studio.gateway import LabelStudioGateway
from labeling.label_studio.payloads import NOTE_KEY, label_config
from labeling.label_studio.server import LocalLabelStudio
from services import db
from services.api import create_app
from services.config import Settings
from services.cycle.flow import Stage
from services.cycle.trigger import maybe_start_cycle
from services.errors import InvalidInput
from services.models import (
    Annotation,
    Cycle,
    InboxEvent,
    ItemStatus,
    LabelTaskState,
)
from services.projects import get_project
from tests.conftest import Digits
from tests.integration.conftest import PrivateRedis
from tests.integration.cycle_helpers import make_digits_project, run_stages, stage
from tests.integration.ls_harness import (
    TOKEN_ENV,
    WEBHOOK_SECRET,
    ApiServer,
    inbox_count,
    wait_for,
)
from tests.integration.ls_project import (
    api,
    api_port,
    broker,
    connect,
    enqueued_event_ids,
    first_cycle,
    inbox_ids,
    ingest_all,
    item_of,
    ls_settings,
    project_id_of,
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


def test_connect_is_idempotent_and_configures_the_project(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    digits: Digits,
    tmp_path: Path,
) -> None:
    project = make_digits_project(sqlite_engine, ls_settings, digits, tmp_path / "p", n_items=60)
    first = connect(sqlite_engine, project.name, label_studio, ls_settings)
    second = connect(sqlite_engine, project.name, label_studio, ls_settings)
    assert first == second
    hooks = annotator.webhooks(first)
    assert len(hooks) == 1
    assert hooks[0]["url"] == link.webhook_url(ls_settings, project.name)
    assert hooks[0]["headers"] == {"X-Focalloop-Secret": WEBHOOK_SECRET}
    views = [
        v for v in annotator.views(first) if v["data"].get("title") == "Hardest first (focalloop)"
    ]
    assert len(views) == 1
    assert views[0]["data"]["ordering"] == ["tasks:predictions_score"]
    # Label Studio validates the generated config; a broken one is refused with its reason.
    with pytest.raises(InvalidInput, match="Label Studio refused"):
        annotator.create_project(
            title="broken config",
            label_config="<View><Choices name='x' toName='y'/></View>",
            description="",
        )
    assert label_config(["a", "b"], "features").count("<Choice ") == 2


def test_connect_refuses_without_a_webhook_secret(
    sqlite_engine: sa.Engine,
    settings: Settings,
    label_studio: LocalLabelStudio,
    ls_token: str,
    digits: Digits,
    tmp_path: Path,
) -> None:
    project = make_digits_project(sqlite_engine, settings, digits, tmp_path / "p", n_items=60)
    with (
        pytest.raises(InvalidInput, match="FOCALLOOP_WEBHOOK_SECRET"),
        db.session_scope(sqlite_engine) as session,
    ):
        link.connect(
            session, project.name, url=label_studio.url, token_env=TOKEN_ENV, settings=settings
        )


# ------------------------------------------------------------------------------- round trip


@pytest.fixture
def round_trip_engine(request: pytest.FixtureRequest, sqlite_engine: sa.Engine) -> sa.Engine:
    if request.param == "postgresql":
        engine: sa.Engine = request.getfixturevalue("pg_engine")
        return engine
    return sqlite_engine


@pytest.mark.parametrize("round_trip_engine", ["sqlite", "postgresql"], indirect=True)
def test_round_trip_hand_off_annotate_webhook_ingest_next_cycle(
    round_trip_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    broker: PrivateRedis,
    api_port: int,
    digits: Digits,
    tmp_path: Path,
) -> None:
    engine = round_trip_engine
    server = ApiServer(lambda: create_app(ls_settings, engine=engine), api_port)
    server.start()
    try:
        project = make_digits_project(
            engine,
            ls_settings,
            digits,
            tmp_path / "p",
            n_items=300,
            batch_size=25,
            retrain_min_new_labels=20,
        )
        ls_project = connect(engine, project.name, label_studio, ls_settings)
        first = first_cycle(engine, project.name, ls_settings)
        all_tasks = tasks_of(engine, project.name)
        assert len(all_tasks) == 25
        assert all(t.state == LabelTaskState.OPEN and t.external_task_id for t in all_tasks)
        # Cold start: no model yet, so no predictions. 20 get answered, 5 stay waiting.
        tasks, waiting = all_tasks[:20], all_tasks[20:]
        assert all(t.prediction_label is None for t in all_tasks)
        assert {item_of(engine, t.item_id).status for t in all_tasks} == {ItemStatus.QUEUED}
        remote = {t.task_id: t for t in annotator.list_tasks(ls_project)}
        assert set(remote) == {t.external_task_id for t in all_tasks}
        # Annotate every task as a person would; each answer comes back by webhook.
        project_id = project_id_of(engine, project.name)
        for task in tasks:
            external = item_of(engine, task.item_id).external_id
            annotator.annotate(
                int(task.external_task_id or 0), true_label(digits, external), modality="features"
            )
        wait_for(lambda: inbox_count(engine, project_id) == 20, what="20 webhook events")
        # The API enqueued ingest messages on the broker's io queue covering every event (one
        # per burst, not one per event).
        wait_for(
            lambda: enqueued_event_ids(broker) == inbox_ids(engine, project_id),
            what="ingest messages for every event",
        )
        report = ingest_all(engine)
        assert (report.stored, report.rejected) == (20, 0)
        for task in tasks:
            item = item_of(engine, task.item_id)
            assert item.status == ItemStatus.LABELED
            assert item.label == true_label(digits, item.external_id)
            assert item.label_source == "label_studio"
        # 20 new labels >= the threshold: the next cycle starts from a new dataset version
        # holding them, trains on it, and hands its batch off with predictions.
        second = maybe_start_cycle(engine, project.name, ls_settings)
        assert second is not None and second.id is not None
        assert second.dataset_version is not None
        run_stages(engine, second.id, ls_settings)
        with db.session_scope(engine) as session:
            done = session.get(Cycle, second.id)
            assert done is not None and done.state == "done" and done.model_version == 1
            first_row = session.get(Cycle, first)
            assert first_row is not None and first_row.dataset_version is None
        new_tasks = [t for t in tasks_of(engine, project.name) if t.cycle_id == second.id]
        assert len(new_tasks) == 25
        version = f"{project.name}-m1"
        assert annotator.model_version(ls_project) == version
        remote = {t.task_id: t for t in annotator.list_tasks(ls_project)}
        for task in new_tasks:
            predictions = remote[int(task.external_task_id or 0)].raw["predictions"]
            assert len(predictions) == 1
            assert predictions[0]["model_version"] == version
            assert predictions[0]["score"] == pytest.approx(task.prediction_score)
            assert predictions[0]["result"][0]["value"]["choices"] == [task.prediction_label]
        # The 5 tasks still waiting from the first cycle now carry the new model's prediction
        # (scored with the pool), and only that one.
        refreshed = {t.id: t for t in tasks_of(engine, project.name)}
        for task in waiting:
            row = refreshed[task.id]
            predictions = remote[int(row.external_task_id or 0)].raw["predictions"]
            assert [p["model_version"] for p in predictions] == [version]
            assert predictions[0]["score"] == pytest.approx(row.prediction_score)
        # Hardest first: the saved view's order is ascending prediction score.
        scores = sorted(float(t.prediction_score or 0) for t in new_tasks)
        assert scores[0] < scores[-1]
    finally:
        server.stop()


def test_hand_off_twice_and_a_lost_import_answer_create_no_second_task(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    digits: Digits,
    tmp_path: Path,
) -> None:
    project = make_digits_project(sqlite_engine, ls_settings, digits, tmp_path / "p", n_items=200)
    ls_project = connect(sqlite_engine, project.name, label_studio, ls_settings)
    cycle = maybe_start_cycle(sqlite_engine, project.name, ls_settings)
    assert cycle is not None and cycle.id is not None
    stage(sqlite_engine, ls_settings, Stage.TRAIN, cycle.id)
    assert stage(sqlite_engine, ls_settings, Stage.SELECT, cycle.id)
    # The first import reaches Label Studio but its answer is lost: simulate it by planning,
    # marking the rows as sent and importing them behind the loop's back.
    with db.session_scope(sqlite_engine) as session:
        row = session.get(Cycle, cycle.id)
        project_row = get_project(session, project.name)
        assert row is not None
        ls_hand_off.plan_hand_off(session, row, project_row)
        pending = ls_tasks.pending_tasks(session, project_row.id or 0)
        payloads = ls_tasks.task_payloads(session, project_row, pending, ls_settings)
        for task in pending:
            # Sent an hour ago and never confirmed: that pusher is gone.
            task.attempted_at = task.created_at - timedelta(hours=1)
            session.add(task)
    annotator.import_tasks(ls_project, payloads)
    assert len(list(annotator.list_tasks(ls_project))) == 20
    report = ls_hand_off.hand_off(sqlite_engine, cycle.id, ls_settings)
    assert (report.created, report.adopted) == (0, 20)
    stage(sqlite_engine, ls_settings, Stage.HAND_OFF, cycle.id)  # the whole stage again
    ls_tasks.push_pending(sqlite_engine, project.name, ls_settings)
    assert len(list(annotator.list_tasks(ls_project))) == 20
    tasks = tasks_of(sqlite_engine, project.name)
    assert len(tasks) == 20 and all(t.state == LabelTaskState.OPEN for t in tasks)
    assert {item_of(sqlite_engine, t.item_id).status for t in tasks} == {ItemStatus.QUEUED}


# ------------------------------------------------------------------------------- the webhook


def test_webhook_secret_size_and_body_checks(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    api: ApiServer,
    digits: Digits,
    tmp_path: Path,
) -> None:
    project = make_digits_project(sqlite_engine, ls_settings, digits, tmp_path / "p", n_items=30)
    url = f"{api.url}/api/v1/webhooks/label-studio?project={project.name}"
    body = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}]}
    project_id = project_id_of(sqlite_engine, project.name)
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"X-Focalloop-Secret": "wrong"}).status_code == 401
    assert inbox_count(sqlite_engine, project_id) == 0
    good = {"X-Focalloop-Secret": WEBHOOK_SECRET}
    too_big = b"{" + b" " * ls_settings.webhook_max_body_bytes + b"}"
    assert httpx.post(url, content=too_big, headers=good).status_code == 413
    assert httpx.post(url, content=b"not json", headers=good).status_code == 400
    assert httpx.post(url, json={"no": "action"}, headers=good).status_code == 400
    unknown = f"{api.url}/api/v1/webhooks/label-studio?project=nope-{project.name}"[:200]
    assert httpx.post(unknown, json=body, headers=good).status_code == 404
    assert inbox_count(sqlite_engine, project_id) == 0
    first = httpx.post(url, json=body, headers=good)
    again = httpx.post(url, json=body, headers=good)
    assert (first.status_code, first.json()["outcome"]) == (200, "stored")
    assert again.json() == {"outcome": "duplicate", "event_id": None}
    ignored = httpx.post(url, json={"action": "PROJECT_UPDATED"}, headers=good)
    assert ignored.json()["outcome"] == "ignored"
    assert inbox_count(sqlite_engine, project_id) == 1


def test_an_unknown_label_is_refused_flagged_and_returned_to_the_annotator(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    api: ApiServer,
    digits: Digits,
    tmp_path: Path,
) -> None:
    project = make_digits_project(sqlite_engine, ls_settings, digits, tmp_path / "p", n_items=60)
    ls_id = connect(sqlite_engine, project.name, label_studio, ls_settings)
    first_cycle(sqlite_engine, project.name, ls_settings)
    task = tasks_of(sqlite_engine, project.name)[0]
    project_id = project_id_of(sqlite_engine, project.name)
    annotator.annotate(int(task.external_task_id or 0), "seven", modality="features")
    wait_for(lambda: inbox_count(sqlite_engine, project_id) == 1, what="the webhook")
    report = ingest_all(sqlite_engine)
    assert (report.stored, report.rejected) == (0, 1)
    item = item_of(sqlite_engine, task.item_id)
    assert item.status == ItemStatus.QUEUED and item.label is None
    assert item.label_issue is not None and "'seven' is not in the label set" in item.label_issue
    with db.session_scope(sqlite_engine) as session:
        event = session.exec(
            select(InboxEvent)
            .where(InboxEvent.project_id == project_id)
            .order_by(col(InboxEvent.id))
        ).first()
        assert event is not None and event.error is not None and "'seven'" in event.error
        assert (
            session.exec(select(Annotation).where(Annotation.item_id == task.item_id)).all() == []
        )
    # The annotator sees it too: the refused answer is gone from Label Studio, which serves the
    # task again with the reason above the image.
    task_id = int(task.external_task_id or 0)
    remote = annotator.task(task_id)
    assert remote["annotations"] == []
    assert "'seven' is not in the label set" in remote["data"][NOTE_KEY]
    assert remote["data"][NOTE_KEY].startswith("Your earlier answer could not be used")
    assert annotator.task_counts(ls_id) == (len(tasks_of(sqlite_engine, project.name)), 0)
    # Its deletion comes back as an event and changes nothing; a correct answer is stored.
    wait_for(lambda: inbox_count(sqlite_engine, project_id) == 2, what="the deletion webhook")
    ingest_all(sqlite_engine)
    assert item_of(sqlite_engine, task.item_id).label_issue is not None
    answer = "eight" if digits.labels[int(item.external_id[1:])] == 8 else "other"
    annotator.annotate(task_id, answer, modality="features")
    wait_for(lambda: inbox_count(sqlite_engine, project_id) == 3, what="the second answer")
    ingest_all(sqlite_engine)
    corrected = item_of(sqlite_engine, task.item_id)
    assert (corrected.label, corrected.label_issue) == (answer, None)
    assert annotator.task(task_id)["annotations"][0]["result"][0]["value"]["choices"] == [answer]


# --------------------------------------------------------------------------- sync and delete


def test_sync_after_api_downtime_and_deletion_reaches_the_next_version(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    api: ApiServer,
    digits: Digits,
    tmp_path: Path,
) -> None:
    project = make_digits_project(sqlite_engine, ls_settings, digits, tmp_path / "p", n_items=120)
    connect(sqlite_engine, project.name, label_studio, ls_settings)
    first_cycle(sqlite_engine, project.name, ls_settings)
    tasks = tasks_of(sqlite_engine, project.name)
    project_id = project_id_of(sqlite_engine, project.name)
    answers = {}
    for task in tasks[:6]:
        answers[task.item_id] = annotator.annotate(
            int(task.external_task_id or 0), "other", modality="features"
        )
    wait_for(lambda: inbox_count(sqlite_engine, project_id) == 6, what="6 webhooks")
    ingest_all(sqlite_engine)
    api.stop()
    # While our API is down: two changed, two deleted, two new, one skipped.
    changed, deleted = tasks[0].item_id, tasks[1].item_id
    annotator.change_annotation(answers[changed], "eight", modality="features")
    annotator.change_annotation(answers[tasks[2].item_id], "eight", modality="features")
    annotator.delete_annotation(answers[deleted])
    annotator.delete_annotation(answers[tasks[3].item_id])
    for task in tasks[6:8]:
        annotator.annotate(int(task.external_task_id or 0), "eight", modality="features")
    annotator.annotate(
        int(tasks[8].external_task_id or 0), None, modality="features", cancelled=True
    )
    api.start()
    assert inbox_count(sqlite_engine, project_id) == 6  # nothing arrived while down
    report = sync.sync_annotations(sqlite_engine, project.name, ls_settings)
    assert (report.new_revisions, report.withdrawn, report.rejected) == (5, 2, 0)
    expected = {
        tasks[0].item_id: "eight",
        tasks[1].item_id: None,
        tasks[2].item_id: "eight",
        tasks[3].item_id: None,
        tasks[4].item_id: "other",
        tasks[5].item_id: "other",
        tasks[6].item_id: "eight",
        tasks[7].item_id: "eight",
        tasks[8].item_id: None,
    }
    for item_id, label in expected.items():
        item = item_of(sqlite_engine, item_id)
        assert item.label == label, item_id
    assert item_of(sqlite_engine, tasks[1].item_id).status == ItemStatus.UNLABELED
    assert item_of(sqlite_engine, tasks[8].item_id).status == ItemStatus.QUEUED
    # A second sync finds nothing new; the history keeps both revisions of the changed answer.
    again = sync.sync_annotations(sqlite_engine, project.name, ls_settings)
    assert (again.new_revisions, again.withdrawn) == (0, 0)
    with db.session_scope(sqlite_engine) as session:
        history = session.exec(select(Annotation.label).where(Annotation.item_id == changed)).all()
        assert sorted(str(label) for label in history) == ["eight", "other"]
    # A deletion delivered by webhook withdraws the label; the next version leaves it out.
    before = inbox_count(sqlite_engine, project_id)
    annotator.delete_annotation(answers[tasks[4].item_id])
    wait_for(
        lambda: inbox_count(sqlite_engine, project_id) == before + 1, what="the deletion webhook"
    )
    ingest_all(sqlite_engine)
    assert item_of(sqlite_engine, tasks[4].item_id).label is None
    from services.datasets.snapshot import snapshot
    from services.datasets.store import open_store
    from services.datasets.versions import read_version

    with db.session_scope(sqlite_engine) as session:
        project_row = get_project(session, project.name)
        version = snapshot(session, project_row, settings=ls_settings)
        store_url = project_row.store_url
    _, table = read_version(open_store(store_url, ls_settings), project.name, version.version)
    labeled = dict(zip(table["item_id"].to_pylist(), table["label"].to_pylist(), strict=True))
    for item_id, label in expected.items():
        external = item_of(sqlite_engine, item_id).external_id
        if item_id == tasks[4].item_id or label is None:
            assert external not in labeled
        else:
            assert labeled[external] == label


def test_an_api_busy_for_two_seconds_still_receives_the_event(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    api_port: int,
    digits: Digits,
    tmp_path: Path,
) -> None:
    """Label Studio waits 1 s for a webhook's answer by default and never retries: an API busy
    for longer before it read the body lost the event until the next reconciliation (seen in
    CI on a loaded machine). The Label Studio we start waits 5 s (WEBHOOK_TIMEOUT)."""
    stalls: list[float] = []

    def stalling_app() -> ASGIApp:
        app = create_app(ls_settings, engine=sqlite_engine)

        async def stall_webhooks(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] == "/api/v1/webhooks/label-studio":
                stalls.append(2.0)
                await asyncio.sleep(2.0)  # busy elsewhere: the database, the thread pool
            await app(scope, receive, send)

        return stall_webhooks

    server = ApiServer(stalling_app, api_port)
    server.start()
    try:
        project = make_digits_project(
            sqlite_engine, ls_settings, digits, tmp_path / "p", n_items=120
        )
        connect(sqlite_engine, project.name, label_studio, ls_settings)
        first_cycle(sqlite_engine, project.name, ls_settings)
        task = tasks_of(sqlite_engine, project.name)[0]
        annotator.annotate(int(task.external_task_id or 0), "eight", modality="features")
        project_id = project_id_of(sqlite_engine, project.name)
        wait_for(lambda: inbox_count(sqlite_engine, project_id) == 1, what="the slow webhook")
        assert stalls == [2.0]
    finally:
        server.stop()


# ------------------------------------------------------------------------------------ review
