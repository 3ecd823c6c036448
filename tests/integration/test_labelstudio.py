"""The Label Studio round trip against a real Label Studio server and our API under a real
uvicorn server: hand-off, webhooks, sync after downtime, deletions, rejected labels, reviews,
media links."""

import base64
import hashlib
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import sqlalchemy as sa
from PIL import Image
from pydantic import SecretStr
from sqlmodel import col, select

from labeling.gateway import LabelStudioGateway
from labeling.payloads import label_config
from labeling.server import LocalLabelStudio
from services import cycles, db, labelstudio
from services.api import create_app
from services.config import Settings
from services.datasets.pool import add_to_pool
from services.errors import InvalidInput
from services.models import (
    Annotation,
    Cycle,
    InboxEvent,
    Item,
    ItemStatus,
    LabelTask,
    LabelTaskState,
    Project,
)
from services.projects import ProjectSpec, create_project, get_project
from tests.conftest import Digits
from tests.integration.conftest import PrivateRedis, free_port, unique_name
from tests.integration.cycle_helpers import make_digits_project, run_stages
from tests.integration.ls_harness import (
    TOKEN_ENV,
    WEBHOOK_SECRET,
    ApiServer,
    annotator,
    inbox_count,
    label_studio,
    ls_token,
    wait_for,
)

__all__ = ["annotator", "label_studio", "ls_token"]  # fixtures, used by name


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def api_port() -> int:
    return free_port()


@pytest.fixture
def ls_settings(
    settings: Settings, broker: PrivateRedis, api_port: int, tmp_path: Path
) -> Settings:
    return settings.model_copy(
        update={
            "api_url": f"http://127.0.0.1:{api_port}",
            "webhook_secret": SecretStr(WEBHOOK_SECRET),
            "broker_url": broker.url,
            "source_roots": [f"file://{tmp_path}"],
        }
    )


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    db.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def api(sqlite_engine: sa.Engine, ls_settings: Settings, api_port: int) -> Iterator[ApiServer]:
    server = ApiServer(lambda: create_app(ls_settings, engine=sqlite_engine), api_port)
    server.start()
    yield server
    server.stop()


def _connect(
    engine: sa.Engine,
    name: str,
    ls: LocalLabelStudio,
    settings: Settings,
    *,
    review_threshold: float = labelstudio.DEFAULT_REVIEW_THRESHOLD,
) -> int:
    with db.session_scope(engine) as session:
        link = labelstudio.connect(
            session,
            name,
            url=ls.url,
            token_env=TOKEN_ENV,
            settings=settings,
            review_threshold=review_threshold,
        )
    return link.project_id


def _project_id(engine: sa.Engine, name: str) -> int:
    with db.session_scope(engine) as session:
        return get_project(session, name).id or 0


def _tasks(engine: sa.Engine, name: str, kind: str = "label") -> list[LabelTask]:
    with db.session_scope(engine) as session:
        project_id = get_project(session, name).id
        return list(
            session.exec(
                select(LabelTask)
                .where(LabelTask.project_id == project_id, LabelTask.kind == kind)
                .order_by(col(LabelTask.id))
            ).all()
        )


def _item(engine: sa.Engine, item_id: int) -> Item:
    with db.session_scope(engine) as session:
        item = session.get(Item, item_id)
        assert item is not None
        return item


def _truth(digits: Digits, external_id: str) -> str:
    return "eight" if digits.labels[int(external_id[1:])] == 8 else "other"


def _ingest_all(engine: sa.Engine) -> cycles.IngestReport:
    with db.session_scope(engine) as session:
        pending = cycles.pending_events(session)
    return cycles.ingest_events(engine, pending)


def _enqueued_event_ids(broker: PrivateRedis) -> set[int]:
    """The inbox event ids carried by the `ingest` messages waiting on the io queue (kombu's
    Redis transport: a JSON envelope around the base64 body [args, kwargs, embed])."""
    ids: set[int] = set()
    for raw in redis.Redis.from_url(broker.url).lrange("io", 0, -1):
        envelope = json.loads(raw)
        assert envelope["headers"]["task"] == "focalloop.ingest"
        args, _, _ = json.loads(base64.b64decode(envelope["body"]))
        ids.update(args[0])
    return ids


def _inbox_ids(engine: sa.Engine, project_id: int) -> set[int]:
    with db.session_scope(engine) as session:
        return {
            int(i or 0)
            for i in session.exec(
                select(InboxEvent.id).where(InboxEvent.project_id == project_id)
            ).all()
        }


def _register(
    engine: sa.Engine, settings: Settings, spec: ProjectSpec, source: str, root: str
) -> None:
    """Create a project and register one pool source from a trusted root."""
    with db.session_scope(engine) as session:
        project_row = create_project(session, spec)
        add_to_pool(session, project_row, source, settings=settings, trusted_roots=[root])


def _first_cycle(engine: sa.Engine, name: str, settings: Settings) -> int:
    cycle = cycles.maybe_start_cycle(engine, name, settings)
    assert cycle is not None and cycle.id is not None
    run_stages(engine, cycle.id, settings)
    return cycle.id


# ---------------------------------------------------------------------------------- connect


def test_connect_is_idempotent_and_configures_the_project(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    digits: Digits,
    tmp_path: Path,
) -> None:
    project = make_digits_project(sqlite_engine, ls_settings, digits, tmp_path / "p", n_items=60)
    first = _connect(sqlite_engine, project.name, label_studio, ls_settings)
    second = _connect(sqlite_engine, project.name, label_studio, ls_settings)
    assert first == second
    hooks = annotator.webhooks(first)
    assert len(hooks) == 1
    assert hooks[0]["url"] == labelstudio.webhook_url(ls_settings, project.name)
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
        labelstudio.connect(
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
        ls_project = _connect(engine, project.name, label_studio, ls_settings)
        first = _first_cycle(engine, project.name, ls_settings)
        all_tasks = _tasks(engine, project.name)
        assert len(all_tasks) == 25
        assert all(t.state == LabelTaskState.OPEN and t.external_task_id for t in all_tasks)
        # Cold start: no model yet, so no predictions. 20 get answered, 5 stay waiting.
        tasks, waiting = all_tasks[:20], all_tasks[20:]
        assert all(t.prediction_label is None for t in all_tasks)
        assert {_item(engine, t.item_id).status for t in all_tasks} == {ItemStatus.QUEUED}
        remote = {t.task_id: t for t in annotator.list_tasks(ls_project)}
        assert set(remote) == {t.external_task_id for t in all_tasks}
        # Annotate every task as a person would; each answer comes back by webhook.
        project_id = _project_id(engine, project.name)
        for task in tasks:
            external = _item(engine, task.item_id).external_id
            annotator.annotate(
                int(task.external_task_id or 0), _truth(digits, external), modality="features"
            )
        wait_for(lambda: inbox_count(engine, project_id) == 20, what="20 webhook events")
        # The API enqueued ingest messages on the broker's io queue covering every event (one
        # per burst, not one per event).
        wait_for(
            lambda: _enqueued_event_ids(broker) == _inbox_ids(engine, project_id),
            what="ingest messages for every event",
        )
        report = _ingest_all(engine)
        assert (report.stored, report.rejected) == (20, 0)
        for task in tasks:
            item = _item(engine, task.item_id)
            assert item.status == ItemStatus.LABELED
            assert item.label == _truth(digits, item.external_id)
            assert item.label_source == "label_studio"
        # 20 new labels >= the threshold: the next cycle starts from a new dataset version
        # holding them, trains on it, and hands its batch off with predictions.
        second = cycles.maybe_start_cycle(engine, project.name, ls_settings)
        assert second is not None and second.id is not None
        assert second.dataset_version is not None
        run_stages(engine, second.id, ls_settings)
        with db.session_scope(engine) as session:
            done = session.get(Cycle, second.id)
            assert done is not None and done.state == "done" and done.model_version == 1
            first_row = session.get(Cycle, first)
            assert first_row is not None and first_row.dataset_version is None
        new_tasks = [t for t in _tasks(engine, project.name) if t.cycle_id == second.id]
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
        refreshed = {t.id: t for t in _tasks(engine, project.name)}
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
    ls_project = _connect(sqlite_engine, project.name, label_studio, ls_settings)
    cycle = cycles.maybe_start_cycle(sqlite_engine, project.name, ls_settings)
    assert cycle is not None and cycle.id is not None
    cycles.train_cycle(sqlite_engine, cycle.id, ls_settings)
    assert cycles.select_cycle(sqlite_engine, cycle.id, ls_settings)
    # The first import reaches Label Studio but its answer is lost: simulate it by planning,
    # marking the rows as sent and importing them behind the loop's back.
    with db.session_scope(sqlite_engine) as session:
        row = session.get(Cycle, cycle.id)
        project_row = get_project(session, project.name)
        assert row is not None
        labelstudio.plan_hand_off(session, row, project_row)
        pending = labelstudio.pending_tasks(session, project_row.id or 0)
        payloads = labelstudio._payloads(session, project_row, pending, ls_settings)
        for task in pending:
            # Sent an hour ago and never confirmed: that pusher is gone.
            task.attempted_at = task.created_at - timedelta(hours=1)
            session.add(task)
    annotator.import_tasks(ls_project, payloads)
    assert len(list(annotator.list_tasks(ls_project))) == 20
    report = labelstudio.hand_off(sqlite_engine, cycle.id, ls_settings)
    assert (report.created, report.adopted) == (0, 20)
    cycles.hand_off(sqlite_engine, cycle.id, ls_settings)  # the whole stage again
    labelstudio.push_pending(sqlite_engine, project.name, ls_settings)
    assert len(list(annotator.list_tasks(ls_project))) == 20
    tasks = _tasks(sqlite_engine, project.name)
    assert len(tasks) == 20 and all(t.state == LabelTaskState.OPEN for t in tasks)
    assert {_item(sqlite_engine, t.item_id).status for t in tasks} == {ItemStatus.QUEUED}


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
    project_id = _project_id(sqlite_engine, project.name)
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


def test_unknown_label_is_rejected_reported_and_flags_the_item(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    api: ApiServer,
    digits: Digits,
    tmp_path: Path,
) -> None:
    project = make_digits_project(sqlite_engine, ls_settings, digits, tmp_path / "p", n_items=60)
    _connect(sqlite_engine, project.name, label_studio, ls_settings)
    _first_cycle(sqlite_engine, project.name, ls_settings)
    task = _tasks(sqlite_engine, project.name)[0]
    project_id = _project_id(sqlite_engine, project.name)
    annotator.annotate(int(task.external_task_id or 0), "seven", modality="features")
    wait_for(lambda: inbox_count(sqlite_engine, project_id) == 1, what="the webhook")
    report = _ingest_all(sqlite_engine)
    assert (report.stored, report.rejected) == (0, 1)
    item = _item(sqlite_engine, task.item_id)
    assert item.status == ItemStatus.QUEUED and item.label is None
    assert item.label_issue is not None and "'seven' is not in the label set" in item.label_issue
    with db.session_scope(sqlite_engine) as session:
        event = session.exec(select(InboxEvent).where(InboxEvent.project_id == project_id)).one()
        assert event.error is not None and "'seven'" in event.error
        assert (
            session.exec(select(Annotation).where(Annotation.item_id == task.item_id)).all() == []
        )


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
    _connect(sqlite_engine, project.name, label_studio, ls_settings)
    _first_cycle(sqlite_engine, project.name, ls_settings)
    tasks = _tasks(sqlite_engine, project.name)
    project_id = _project_id(sqlite_engine, project.name)
    answers = {}
    for task in tasks[:6]:
        answers[task.item_id] = annotator.annotate(
            int(task.external_task_id or 0), "other", modality="features"
        )
    wait_for(lambda: inbox_count(sqlite_engine, project_id) == 6, what="6 webhooks")
    _ingest_all(sqlite_engine)
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
    report = labelstudio.sync_annotations(sqlite_engine, project.name, ls_settings)
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
        item = _item(sqlite_engine, item_id)
        assert item.label == label, item_id
    assert _item(sqlite_engine, tasks[1].item_id).status == ItemStatus.UNLABELED
    assert _item(sqlite_engine, tasks[8].item_id).status == ItemStatus.QUEUED
    # A second sync finds nothing new; the history keeps both revisions of the changed answer.
    again = labelstudio.sync_annotations(sqlite_engine, project.name, ls_settings)
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
    _ingest_all(sqlite_engine)
    assert _item(sqlite_engine, tasks[4].item_id).label is None
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
        external = _item(sqlite_engine, item_id).external_id
        if item_id == tasks[4].item_id or label is None:
            assert external not in labeled
        else:
            assert labeled[external] == label


# ------------------------------------------------------------------------------------ review


def test_review_tasks_for_confidently_contradicted_labels(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    api: ApiServer,
    digits: Digits,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    n = 400
    ids = np.array([f"d{i:04d}" for i in range(n)])
    truth = np.where(digits.labels[:n] == 8, "eight", "other")
    given = truth.copy()
    flipped = [i for i in range(n) if truth[i] == "other"][:3]
    given[flipped] = "eight"  # three obvious mistakes among the seed labels
    seed_labels = np.where(np.arange(n) < 300, given, "")  # the first 300 come labeled
    np.savez(folder / "pool.npz", features=digits.features[:n], item_ids=ids, labels=seed_labels)
    name = unique_name("rev")
    _register(
        sqlite_engine,
        ls_settings,
        ProjectSpec(
            name=name,
            labels=["other", "eight"],
            modality="features",
            store_url=f"file://{folder / 'store'}",
            batch_size=10,
            retrain_min_new_labels=1,
        ),
        str(folder / "pool.npz"),
        f"file://{folder}",
    )
    ls_project = _connect(sqlite_engine, name, label_studio, ls_settings)
    _first_cycle(sqlite_engine, name, ls_settings)
    reviews = _tasks(sqlite_engine, name, kind="review")
    reviewed_items = {_item(sqlite_engine, t.item_id).external_id for t in reviews}
    assert {str(ids[i]) for i in flipped} <= reviewed_items
    assert len(reviews) <= 20
    remote = {t.task_id: t for t in annotator.list_tasks(ls_project)}
    target = next(
        t for t in reviews if _item(sqlite_engine, t.item_id).external_id == ids[flipped[0]]
    )
    shown = remote[int(target.external_task_id or 0)]
    assert shown.kind == "review"
    assert "labeled 'eight'" in shown.raw["data"]["focalloop_note"]
    assert _item(sqlite_engine, target.item_id).status == ItemStatus.IN_REVIEW
    # The reviewer corrects the label: it replaces the old one, which stays in the history.
    project_id = _project_id(sqlite_engine, name)
    before = inbox_count(sqlite_engine, project_id)
    annotator.annotate(int(target.external_task_id or 0), "other", modality="features")
    wait_for(lambda: inbox_count(sqlite_engine, project_id) == before + 1, what="the review")
    _ingest_all(sqlite_engine)
    item = _item(sqlite_engine, target.item_id)
    assert (item.status, item.label) == (ItemStatus.LABELED, "other")
    with db.session_scope(sqlite_engine) as session:
        history = session.exec(
            select(Annotation.source, Annotation.label).where(Annotation.item_id == item.id)
        ).all()
        assert sorted(history) == [("label_studio", "other"), ("seed", "eight")]
        task = session.get(LabelTask, target.id)
        assert task is not None and task.state == LabelTaskState.ANSWERED
    # The next cycle never sends the same item to review again.
    cycle = cycles.maybe_start_cycle(sqlite_engine, name, ls_settings)
    assert cycle is not None and cycle.id is not None
    run_stages(sqlite_engine, cycle.id, ls_settings)
    items_reviewed = [t.item_id for t in _tasks(sqlite_engine, name, kind="review")]
    assert len(items_reviewed) == len(set(items_reviewed))


# ------------------------------------------------------------------------------------- media


def _png(path: Path, value: int) -> bytes:
    Image.fromarray(np.full((12, 12), value, dtype=np.uint8)).save(path)
    return path.read_bytes()


@pytest.mark.parametrize("source", ["local", "s3"])
def test_task_image_links_serve_the_image_bytes(
    source: str,
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    api: ApiServer,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    originals = {f"img{i}.png": _png(folder / f"img{i}.png", 20 * i) for i in range(6)}
    source_url = f"file://{folder}"
    settings = ls_settings
    if source == "s3":
        from services.datasets.store import s3_client

        bucket = unique_name("images")
        client = s3_client(ls_settings)
        client.create_bucket(Bucket=bucket)
        for name, body in originals.items():
            client.put_object(Bucket=bucket, Key=f"raw/{name}", Body=body)
        source_url = f"s3://{bucket}/raw"
        settings = ls_settings.model_copy(update={"source_roots": [source_url]})
    name = unique_name("img")
    _register(
        sqlite_engine,
        settings,
        ProjectSpec(
            name=name,
            labels=["dark", "light"],
            modality="image",
            store_url=f"file://{tmp_path / 'store'}",
            image_size=8,
            image_channels=1,
            batch_size=4,
        ),
        source_url,
        source_url,
    )
    ls_project = _connect(sqlite_engine, name, label_studio, settings)
    _first_cycle(sqlite_engine, name, settings)
    tasks = list(annotator.list_tasks(ls_project))
    assert len(tasks) == 4
    for task in tasks:
        url = task.raw["data"]["image"]
        if source == "local":
            assert url.startswith(f"{api.url}/api/v1/media/{name}/")
        else:
            assert url.startswith(ls_settings.s3_endpoint_url or "")
        response = httpx.get(url)
        assert response.status_code == 200
        external = _item(sqlite_engine, int(task.item_id or 0)).external_id
        assert (
            hashlib.sha256(response.content).hexdigest()
            == hashlib.sha256(
                originals[Path(_item(sqlite_engine, int(task.item_id or 0)).uri).name]
            ).hexdigest()
        ), external
    if source == "local":
        tampered = tasks[0].raw["data"]["image"].replace("signature=", "signature=0")[:-1]
        assert httpx.get(tampered).status_code in (403, 422)
        other_item = (
            tasks[0]
            .raw["data"]["image"]
            .replace(f"/{tasks[0].item_id}?", f"/{int(tasks[0].item_id or 0) + 1}?")
        )
        assert httpx.get(other_item).status_code == 403


def test_media_link_refuses_a_changed_source(
    sqlite_engine: sa.Engine, ls_settings: Settings, api: ApiServer, tmp_path: Path
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    _png(folder / "a.png", 10)
    _png(folder / "b.png", 200)
    name = unique_name("img")
    spec = ProjectSpec(
        name=name,
        labels=["x", "y"],
        modality="image",
        store_url=f"file://{tmp_path / 'store'}",
        image_size=8,
        image_channels=1,
    )
    _register(sqlite_engine, ls_settings, spec, f"file://{folder}", f"file://{folder}")
    with db.session_scope(sqlite_engine) as session:
        project_row = get_project(session, name)
        item = session.exec(select(Item).where(Item.project_id == project_row.id)).first()
        assert item is not None
        project_row.labeler = {
            "kind": "label_studio",
            "url": "http://unused",
            "token_env": "X",
            "project_id": 1,
            "webhook_id": 1,
            "view_id": 1,
            "media": "api",
        }
        url = labelstudio.media_url(
            project_row, item, labelstudio.LabelStudioLink.of(project_row), ls_settings
        )
        path = Path(item.uri.removeprefix("file://"))
    assert httpx.get(url).status_code == 200
    _png(path, 99)  # the file changes after registration
    assert httpx.get(url).status_code == 409


def test_project_rows_are_untouched_by_a_refused_connect(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    ls_token: str,
    digits: Digits,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = make_digits_project(sqlite_engine, ls_settings, digits, tmp_path / "p", n_items=30)
    monkeypatch.setenv(TOKEN_ENV, "not-the-token")
    with pytest.raises(InvalidInput, match="HTTP 401"), db.session_scope(sqlite_engine) as s:
        labelstudio.connect(
            s, project.name, url=label_studio.url, token_env=TOKEN_ENV, settings=ls_settings
        )
    with db.session_scope(sqlite_engine) as session:
        row = session.exec(select(Project).where(Project.name == project.name)).one()
        assert row.labeler["kind"] == "simulated"


def test_a_refused_hand_off_fails_the_cycle_and_releases_its_batch(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    ls_token: str,
    digits: Digits,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = make_digits_project(sqlite_engine, ls_settings, digits, tmp_path / "p", n_items=60)
    _connect(sqlite_engine, project.name, label_studio, ls_settings)
    monkeypatch.delenv(TOKEN_ENV)  # the worker has no token: Label Studio cannot be asked
    cycle_id = _first_cycle(sqlite_engine, project.name, ls_settings)
    with db.session_scope(sqlite_engine) as session:
        cycle = session.get(Cycle, cycle_id)
        assert cycle is not None and cycle.state == "failed"
        assert cycle.failure_reason is not None
        assert f"environment variable {TOKEN_ENV} is not set" in cycle.failure_reason
        project_id = get_project(session, project.name).id
        statuses = set(session.exec(select(Item.status).where(Item.project_id == project_id)).all())
    assert statuses == {ItemStatus.UNLABELED}
    assert _tasks(sqlite_engine, project.name) == []
