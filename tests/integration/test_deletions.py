"""Deletions win. Before, an annotation deleted in Label Studio came back when an update stamped
before the delete arrived late, and a delete that arrived before its create left the label in
place. Label Studio never reuses an annotation id, so once deleted, every revision of it that
arrives later is a no-op (a tombstone keyed by the annotation)."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import select

from labeling.label_studio.events import DELETED, ingest_pending
from labeling.label_studio.link import SOURCE
from services import db
from services.config import Settings
from services.models import InboxEvent, Item
from services.projects import get_project
from tests.conftest import Digits
from tests.integration.cycle_helpers import make_digits_project
from tests.integration.test_poison import body, open_tasks

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


def stamp(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def created(annotation_id: int, task: tuple[int, int], at: datetime, label: str) -> dict[str, Any]:
    event = body(annotation_id, *task, updated_at=stamp(at), created_at=stamp(T0))
    event["annotation"]["result"][0]["value"] = {"choices": [label]}
    return event


def updated(annotation_id: int, task: tuple[int, int], at: datetime, label: str) -> dict[str, Any]:
    return created(annotation_id, task, at, label) | {"action": "ANNOTATION_UPDATED"}


def deleted(annotation_id: int) -> dict[str, Any]:
    return {"action": DELETED, "annotations": [{"id": annotation_id}]}


class Inbox:
    """Events delivered to the inbox one at a time, in the order a test chooses, each ingested
    as the worker would after its webhook."""

    def __init__(self, engine: sa.Engine, project: str) -> None:
        self.engine = engine
        self.project = project  # event keys are unique across the shared PostgreSQL database
        with db.session_scope(engine) as session:
            self.project_id = get_project(session, project).id
        self.count = 0

    def deliver(self, *events: dict[str, Any]) -> None:
        with db.session_scope(self.engine) as session:
            for event in events:
                self.count += 1
                session.add(
                    InboxEvent(
                        source=SOURCE,
                        event_key=f"{self.project}-{self.count}",
                        action=event["action"],
                        project_id=self.project_id,
                        payload=event,
                    )
                )
        totals = ingest_pending(self.engine)
        assert totals.rejected == 0

    def label_of(self, item_id: int) -> tuple[str | None, str]:
        with db.session_scope(self.engine) as session:
            item = session.exec(select(Item).where(Item.id == item_id)).one()
            return item.label, str(item.status)


@pytest.fixture
def inbox_and_tasks(
    engine: sa.Engine, settings: Settings, digits: Digits, tmp_path: Path
) -> tuple[Inbox, list[tuple[int, int]]]:
    project = make_digits_project(engine, settings, digits, tmp_path, n_items=6)
    return Inbox(engine, project.name), open_tasks(engine, project.name)


def test_an_update_stamped_before_the_delete_that_arrives_late_is_a_no_op(
    inbox_and_tasks: tuple[Inbox, list[tuple[int, int]]],
) -> None:
    inbox, tasks = inbox_and_tasks
    inbox.deliver(created(41, tasks[0], T0, "eight"))
    assert inbox.label_of(tasks[0][1]) == ("eight", "labeled")
    inbox.deliver(deleted(41))
    assert inbox.label_of(tasks[0][1])[0] is None
    inbox.deliver(updated(41, tasks[0], T0 + timedelta(seconds=5), "other"))
    assert inbox.label_of(tasks[0][1])[0] is None


def test_a_delete_that_arrives_before_its_create_leaves_no_label(
    inbox_and_tasks: tuple[Inbox, list[tuple[int, int]]],
) -> None:
    inbox, tasks = inbox_and_tasks
    inbox.deliver(deleted(42))
    inbox.deliver(created(42, tasks[1], T0, "eight"))
    assert inbox.label_of(tasks[1][1])[0] is None
    # Other annotations of the same item still count.
    inbox.deliver(created(43, tasks[1], T0 + timedelta(seconds=1), "other"))
    assert inbox.label_of(tasks[1][1]) == ("other", "labeled")


def test_reordered_events_in_one_batch_end_deleted(
    inbox_and_tasks: tuple[Inbox, list[tuple[int, int]]],
) -> None:
    inbox, tasks = inbox_and_tasks
    inbox.deliver(
        deleted(44),
        updated(44, tasks[2], T0 + timedelta(seconds=3), "other"),
        created(44, tasks[2], T0, "eight"),
    )
    assert inbox.label_of(tasks[2][1])[0] is None
