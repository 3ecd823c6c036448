"""The simulated labeler: answers every hand-off at once from a stored truth table, optionally
wrong at a given rate, so the loop can be run, studied and tested without people.

Its answers travel the same road as a labeling tool's: stored as inbox events, then ingested
into annotations (source "simulated"). Noise is decided per item from the project's seed and the
item's id, so a repeated hand-off, a redelivered message or a rerun gives the same answers.
"""

import hashlib
import io
from collections.abc import Sequence
from datetime import datetime
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlmodel import Session, col, select

from labeling.base import IngestReport, ReviewPolicy
from services.config import Settings
from services.datasets.store import open_store, safe_key, sha256_hex
from services.db import lock_for_write, session_scope
from services.errors import Conflict, InvalidInput, NotFound
from services.models import CycleSelection, InboxEvent, Item, ItemStatus, Project, utcnow
from services.projects import get_project
from services.state import AnnotationInput, record_annotations, transition_items

KIND = "simulated"
SOURCE = "simulated"


def simulated_answer(
    truth: str, labels: Sequence[str], *, noise: float, seed: int, key: str
) -> str:
    """The label a simulated annotator gives an item whose true label is `truth`: the truth, or
    with probability `noise` a uniformly drawn other class. Deterministic in (seed, key)."""
    if noise <= 0.0:
        return truth
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    rng = np.random.default_rng([seed, digest])
    if rng.random() >= noise:
        return truth
    others = [label for label in labels if label != truth]
    return others[int(rng.integers(len(others)))]


def check_noise(noise: float) -> float:
    """A simulated annotator's error rate: in [0, 1) (InvalidInput otherwise)."""
    if not 0.0 <= noise < 1.0:
        raise InvalidInput(f"noise must be in [0, 1), got {noise}")
    return noise


def set_simulated_labeler(
    session: Session,
    project_name: str,
    truth: pa.Table,
    settings: Settings,
    *,
    annotator: str,
    noise: float = 0.0,
) -> Project:
    """Make a simulated annotator the project's labeler: it answers hand-offs from `truth`
    (columns item_id, label), stored write-once in the project's store, wrong with probability
    `noise` (a uniformly drawn other class)."""
    check_noise(noise)
    project = get_project(session, project_name, for_update=True)
    for column in ("item_id", "label"):
        if column not in truth.column_names:
            raise InvalidInput("the truth table needs columns item_id, label")
    outside = sorted(set(truth["label"].to_pylist()) - set(project.labels))
    if outside:
        raise InvalidInput(f"truth labels {outside[:10]} are not in the label set")
    sink = io.BytesIO()
    pq.write_table(
        truth.select(["item_id", "label"]).cast(
            pa.schema([pa.field("item_id", pa.string()), pa.field("label", pa.string())])
        ),
        sink,
    )
    body = sink.getvalue()
    key = safe_key(project.name, "labeler", f"truth-{sha256_hex(body)}.parquet")
    open_store(project.store_url, settings, create=True).put_if_absent(key, body)
    project.labeler = {"kind": KIND, "truth_key": key, "annotator": annotator, "noise": noise}
    session.add(project)
    session.flush()
    return project


def _truth(project: Project, settings: Settings) -> dict[str, str]:
    key = str(project.labeler.get("truth_key", ""))
    table = pq.read_table(io.BytesIO(open_store(project.store_url, settings).get(key)))
    return dict(zip(table["item_id"].to_pylist(), table["label"].to_pylist(), strict=True))


class SimulatedLabeler:
    """Answers each batch at once (as inbox events) from the project's truth table."""

    source: ClassVar[str] = SOURCE
    answers_later: ClassVar[bool] = False  # within the hand-off; its loop starts each cycle

    def hand_off(self, engine: sa.Engine, cycle_id: int, settings: Settings) -> list[int]:
        with session_scope(engine) as session:
            rows = session.execute(
                sa.select(col(Item.id), col(Item.external_id), col(Item.project_id))
                .join(CycleSelection, col(CycleSelection.item_id) == col(Item.id))
                .where(
                    col(CycleSelection.cycle_id) == cycle_id,
                    col(Item.status) == ItemStatus.SELECTED,
                )
                .order_by(col(CycleSelection.rank))
            ).all()
            if not rows:
                return []  # answered already (a repeated hand-off), or nothing was selected
            project = session.get(Project, rows[0][2])
            assert project is not None
            truth = _truth(project, settings)
            transition_items(
                session,
                [item_id for item_id, _, _ in rows],
                ItemStatus.QUEUED,
                expected=ItemStatus.SELECTED,
            )
            now = utcnow().isoformat()
            noise = float(project.labeler.get("noise", 0.0))
            events = [
                InboxEvent(
                    source=SOURCE,
                    event_key=f"cycle-{cycle_id}-item-{item_id}",
                    action="ANNOTATION_CREATED",
                    project_id=project.id,
                    payload={
                        "item_id": item_id,
                        "label": simulated_answer(
                            truth[external_id],
                            project.labels,
                            noise=noise,
                            seed=project.seed,
                            key=external_id,
                        )
                        if external_id in truth
                        else None,
                        "annotator": str(project.labeler.get("annotator", KIND)),
                        "at": now,
                    },
                )
                for item_id, external_id, _ in rows
            ]
            session.add_all(events)
            session.flush()
            return [event.id or 0 for event in events]

    def ingest(self, engine: sa.Engine, event_ids: Sequence[int]) -> IngestReport:
        """The events' answers become annotations, all in one go; when that fails as a whole,
        each in a savepoint of its own, so a bad event is recorded with its error and the
        others go on. An event already processed is a duplicate."""
        with session_scope(engine) as session:
            lock_for_write(session)
            events = [
                event
                for event in session.exec(
                    select(InboxEvent)
                    .where(col(InboxEvent.id).in_(sorted(event_ids)))
                    .order_by(col(InboxEvent.id))
                    .with_for_update()
                ).all()
                if event.processed_at is None
            ]
            report = IngestReport(duplicates=len(set(event_ids)) - len(events))
            try:
                with session.begin_nested():
                    rows = record_annotations(session, [_answer(event) for event in events])
                report = report + _counted(rows)
            except INGEST_ERRORS:
                for event in events:
                    report = report + _apply_alone(session, event)
            now = utcnow()
            for event in events:
                event.processed_at = now
                session.add(event)
        return report

    def reconcile(self, engine: sa.Engine, project_name: str, settings: Settings) -> None:
        return None  # every answer is stored at hand-off: there is nothing to catch up with

    def review_policy(self, project: Project) -> ReviewPolicy | None:
        return None  # the truth table would only confirm itself

    def check(self, project: Project, settings: Settings) -> bool:
        return False  # no tool: the answers come from a table


INGEST_ERRORS = (InvalidInput, Conflict, NotFound, KeyError, ValueError)


def _counted(rows: Sequence[object | None]) -> IngestReport:
    stored = sum(row is not None for row in rows)
    return IngestReport(stored=stored, duplicates=len(rows) - stored)


def _apply_alone(session: Session, event: InboxEvent) -> IngestReport:
    try:
        with session.begin_nested():
            return _counted(record_annotations(session, [_answer(event)]))
    except INGEST_ERRORS as error:
        event.error = str(error)[:4000]
        return IngestReport(rejected=1)


def _answer(event: InboxEvent) -> AnnotationInput:
    payload = event.payload
    label = payload.get("label")
    return AnnotationInput(
        item_id=int(payload["item_id"]),
        label=None if label is None else str(label),
        source=event.source,
        external_id=event.event_key,
        updated_at=datetime.fromisoformat(str(payload["at"])),
        annotator=str(payload.get("annotator", event.source)),
        cancelled=label is None,
    )
