"""Malformed Label Studio events: refused at the door (400, nothing stored) where the body shows
the fault; quarantined with their reason where only ingestion finds it, while every other event
flows on. Each case below once made every later ingest raise, holding all labels back."""

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlmodel import col, func, select

from labeling.label_studio.events import ingest_pending
from labeling.label_studio.link import SOURCE
from services import db
from services.api.app import create_app
from services.config import Settings
from services.models import Annotation, InboxEvent, Item, ItemStatus, LabelTask, LabelTaskState
from services.projects import get_project
from services.status import queue_status
from tests.conftest import Digits
from tests.integration.conftest import free_port
from tests.integration.cycle_helpers import make_digits_project

SECRET = "poison-test-secret"


def body(annotation_id: int, task_id: int, item_id: int, **changes: Any) -> dict[str, Any]:
    """An ANNOTATION_CREATED body as Label Studio 1.23 sends it; `changes` override the
    annotation's fields."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    annotation = {
        "id": annotation_id,
        "result": [
            {
                "from_name": "label",
                "to_name": "features",
                "type": "choices",
                "value": {"choices": ["eight"]},
            }
        ],
        "was_cancelled": False,
        "created_at": now,
        "updated_at": now,
        "task": task_id,
        "completed_by": 1,
    } | changes
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": annotation,
        "task": {"id": task_id, "data": {"focalloop_item": item_id, "focalloop_kind": "label"}},
    }


def open_tasks(engine: sa.Engine, name: str) -> list[tuple[int, int]]:
    """Open label tasks (Label Studio ids 1..n) for the project's items: [(task id, item id)]."""
    with db.session_scope(engine) as session:
        project = get_project(session, name)
        item_ids = session.exec(
            select(Item.id).where(Item.project_id == project.id).order_by(col(Item.id))
        ).all()
        for task_id, item_id in enumerate(item_ids, start=1):
            session.add(
                LabelTask(
                    project_id=project.id or 0,
                    item_id=item_id or 0,
                    kind="label",
                    state=LabelTaskState.OPEN,
                    external_task_id=task_id,
                )
            )
        session.execute(
            sa.update(Item).where(col(Item.project_id) == project.id).values(status="queued")
        )
    return [(task_id, item_id or 0) for task_id, item_id in enumerate(item_ids, start=1)]


POISON: dict[str, dict[str, Any]] = {
    "a timestamp before year 1 in UTC": {"updated_at": "0001-01-01T00:30:00+01:00"},
    "a task id past 64 bits": {"task": 2**63 + 5},
    "an annotation id of 251 digits": {"id": 10**250},
    "a choice value given as a list": {
        "result": [{"from_name": "label", "type": "choices", "value": ["eight"]}]
    },
}


@pytest.fixture
def door(engine: sa.Engine, settings: Settings) -> Iterator[TestClient]:
    settings = settings.model_copy(
        update={
            "webhook_secret": SecretStr(SECRET),
            "broker_url": f"redis://127.0.0.1:{free_port()}/0",  # no ingest is enqueued
        }
    )
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client


def _inbox(engine: sa.Engine) -> int:
    with db.session_scope(engine) as session:
        return int(session.exec(select(func.count()).select_from(InboxEvent)).one())


def event_counts(engine: sa.Engine, settings: Settings, name: str) -> dict[str, int]:
    """The project's nonzero focalloop_label_events_{applied,refused,pending} from /metrics."""
    with TestClient(create_app(settings, engine=engine)) as client:
        text = client.get("/metrics").text
    counts = {}
    for outcome in ("applied", "refused", "pending"):
        suffix = "" if outcome == "pending" else "_total"
        line = f'focalloop_label_events_{outcome}{suffix}{{project="{name}"}} '
        (value,) = [row[len(line) :] for row in text.splitlines() if row.startswith(line)]
        if float(value):
            counts[outcome] = int(float(value))
    return counts


@pytest.mark.parametrize("fault", sorted(POISON))
def test_a_malformed_annotation_is_refused_at_the_door_and_nothing_is_stored(
    door: TestClient,
    engine: sa.Engine,
    settings: Settings,
    digits: Digits,
    tmp_path: Path,
    fault: str,
) -> None:
    project = make_digits_project(engine, settings, digits, tmp_path, n_items=5)
    (task_id, item_id), *_ = open_tasks(engine, project.name)
    before = _inbox(engine)
    answer = door.post(
        f"/api/v1/webhooks/label-studio?project={project.name}",
        headers={"X-Focalloop-Secret": SECRET},
        json=body(7, task_id, item_id, **POISON[fault]),
    )
    assert answer.status_code == 400, answer.text
    assert len(answer.text) < 500  # the reason, not the body echoed back
    assert _inbox(engine) == before


@pytest.mark.parametrize(
    ("fault", "raw"),
    [
        ("NaN", b'{"action": "ANNOTATION_CREATED", "annotation": {"id": NaN}}'),
        ("Infinity", b'{"action": "ANNOTATION_CREATED", "annotation": {"id": Infinity}}'),
        ("nesting 1,000 deep", b'{"action": "x", "a": ' + b"[" * 1000 + b"]" * 1000 + b"}"),
        ("a 5,001-digit integer", b'{"action": "x", "n": ' + b"7" * 5001 + b"}"),
    ],
)
def test_json_a_parser_chokes_on_is_a_400_not_a_500(
    door: TestClient,
    engine: sa.Engine,
    settings: Settings,
    digits: Digits,
    tmp_path: Path,
    fault: str,
    raw: bytes,
) -> None:
    project = make_digits_project(engine, settings, digits, tmp_path, n_items=5)
    before = _inbox(engine)
    answer = door.post(
        f"/api/v1/webhooks/label-studio?project={project.name}",
        headers={"X-Focalloop-Secret": SECRET, "Content-Type": "application/json"},
        content=raw,
    )
    assert answer.status_code == 400, (fault, answer.status_code, answer.text[:300])
    assert _inbox(engine) == before


def test_events_that_fail_at_ingest_are_quarantined_and_the_others_flow(
    engine: sa.Engine, settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    """Poison stored behind the door (an older focalloop, a sync, a hand edit) must not hold
    the valid events back: each bad one is marked with its reason, every good one ingested."""
    project = make_digits_project(engine, settings, digits, tmp_path, n_items=12)
    tasks = open_tasks(engine, project.name)
    bodies: list[Any] = [body(100 + i, *tasks[i]) for i in range(8)]
    for offset, fault in enumerate(sorted(POISON)):
        task_id, item_id = tasks[8 + offset]
        bodies.insert(2 * offset + 1, body(200 + offset, task_id, item_id, **POISON[fault]))
    # A payload that is not even an object (a hand edit of the inbox) fails in no way the
    # parser foresaw; it too must be set aside rather than fail every batch.
    bodies.insert(5, ["not", "an", "annotation", "event"])
    with db.session_scope(engine) as session:
        project_id = get_project(session, project.name).id
        for number, event in enumerate(bodies):
            session.add(
                InboxEvent(
                    source=SOURCE,
                    event_key=f"poison-{number}",
                    action="ANNOTATION_CREATED",
                    project_id=project_id,
                    payload=json.loads(json.dumps(event)),
                )
            )
    assert event_counts(engine, settings, project.name) == {"pending": 13}
    totals = ingest_pending(engine)
    assert (totals.stored, totals.rejected) == (8, 5)
    # The metrics tell stored-and-applied from stored-then-refused (webhook_events_total's
    # "stored" alone counted both alike).
    assert event_counts(engine, settings, project.name) == {"applied": 8, "refused": 5}
    assert ingest_pending(engine).events == 0  # nothing is left to block the next ingest
    with db.session_scope(engine) as session:
        labeled = session.exec(
            select(func.count())
            .select_from(Item)
            .where(Item.project_id == project_id, Item.status == ItemStatus.LABELED)
        ).one()
        stored = session.exec(
            select(func.count()).select_from(Annotation).where(Annotation.project_id == project_id)
        ).one()
        errors = session.exec(
            select(InboxEvent.error).where(
                InboxEvent.project_id == project_id, col(InboxEvent.error).is_not(None)
            )
        ).all()
        queue = queue_status(session, get_project(session, project.name))
    assert (labeled, stored, len(errors)) == (8, 8, 5)
    reasons = sorted(str(error) for error in errors)
    # What an operator sees in `/queue` (and `labelstudio status`): the count and each reason.
    assert queue.rejected_events == 5
    assert sorted(r.error for r in queue.recent_rejections) == reasons
    assert all(len(reason) < 4000 for reason in reasons)
    assert [reason.split()[0] for reason in reasons] == [
        "a",  # a choices region whose value is not {'choices': [...]}
        "annotation",  # without an integer id in [0, 2**63)
        "annotation",  # 201 names task 2**63 + 5 but comes with task ...
        "bad",  # timestamp ... date value out of range
        "could",  # not be applied: AttributeError (the list payload)
    ], reasons
