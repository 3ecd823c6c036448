"""The stream annotators label from ("Label All Tasks", Label Studio's next-task endpoint),
against a real Label Studio: evaluation items and reviews first, with nothing pre-selected,
then every open task in ascending score of the current model, waiting tasks from an older batch
included. Before, the stream followed task ids (sequential sampling): an older batch's tasks
came first whatever the current model thought of them, and evaluation items arrived with the
model's guess selected."""

from pathlib import Path

import sqlalchemy as sa
from sqlmodel import select

from labeling.label_studio.gateway import LabelStudioGateway
from labeling.label_studio.server import LocalLabelStudio
from services import db
from services.config import Settings
from services.cycle.flow import Stage, Step
from services.cycle.ingest import pending_events
from services.cycle.stages import run_step
from services.cycle.trigger import maybe_start_cycle
from services.models import Annotation, Cycle, ItemStatus, LabelTask, LabelTaskState
from services.projects import get_project
from services.status import queue_status
from tests.conftest import Digits
from tests.integration.cycle_helpers import make_digits_project, run_stages
from tests.integration.ls_harness import (
    ApiServer,
    inbox_count,
    wait_for,
)
from tests.integration.ls_project import (
    api,
    api_port,
    broker,
    connect,
    first_cycle,
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


def waiting_tasks(engine: sa.Engine, name: str) -> dict[int, LabelTask]:
    """The project's tasks waiting for an answer (open, their item queued or in review), both
    kinds, by Label Studio task id."""
    rows = tasks_of(engine, name, "label") + tasks_of(engine, name, "review")
    return {
        int(row.external_task_id or 0): row
        for row in rows
        if row.state == LabelTaskState.OPEN
        and item_of(engine, row.item_id).status in (ItemStatus.QUEUED, ItemStatus.IN_REVIEW)
    }


def test_label_all_tasks_serves_unanchored_tasks_then_hardest_first(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    api: ApiServer,
    digits: Digits,
    tmp_path: Path,
) -> None:
    engine = sqlite_engine
    project = make_digits_project(
        engine,
        ls_settings,
        digits,
        tmp_path / "p",
        n_items=400,
        batch_size=40,
        retrain_min_new_labels=20,
        gate={"eval_fraction": 0.1, "eval_batch_share": 0.25},
    )
    ls_project = connect(engine, project.name, label_studio, ls_settings)
    first_cycle(engine, project.name, ls_settings)
    first_batch = tasks_of(engine, project.name)
    assert len(first_batch) == 40
    # Answer 24 cold-start picks; the 10 evaluation picks (they come first) and 6 others wait.
    for task in first_batch[10:34]:
        external = item_of(engine, task.item_id).external_id
        annotator.annotate(
            int(task.external_task_id or 0), true_label(digits, external), modality="features"
        )
    project_id = project_id_of(engine, project.name)
    wait_for(lambda: inbox_count(engine, project_id) == 24, what="24 webhooks")
    ingest_all(engine)
    second = maybe_start_cycle(engine, project.name, ls_settings)
    assert second is not None and second.id is not None
    run_stages(engine, second.id, ls_settings)
    with db.session_scope(engine) as session:
        trained = session.get(Cycle, second.id)
        assert trained is not None and trained.model_version is not None

    waiting = waiting_tasks(engine, project.name)
    assert len(waiting) >= 56  # 16 from the first batch, 40 new (and any reviews)
    unanchored = {
        task_id
        for task_id, row in waiting.items()
        if row.kind == "review" or item_of(engine, row.item_id).eval_set
    }
    assert unanchored, "the first batch's evaluation picks should still be waiting"
    for task_id in unanchored:
        (prediction,) = annotator.task(task_id)["predictions"]
        assert prediction["result"] == []  # nothing pre-selected
    served: list[int] = []
    while (next_task := annotator.next_task(ls_project)) is not None:
        task_id = int(next_task["id"])
        served.append(task_id)
        assert len(served) <= len(waiting), "Label Studio served a task twice"
        external = item_of(engine, waiting[task_id].item_id).external_id
        annotator.annotate(task_id, true_label(digits, external), modality="features")
    assert sorted(served) == sorted(waiting)
    assert set(served[: len(unanchored)]) == unanchored
    ordinary = served[len(unanchored) :]
    scores = [float(waiting[task_id].prediction_score or 0) for task_id in ordinary]
    assert scores == sorted(scores)
    # The waiting tasks of the first batch are placed by the current model, not by their ids.
    first_ids = {int(t.external_task_id or 0) for t in first_batch[:10] + first_batch[34:]}
    first_ids -= unanchored
    positions = [served.index(task_id) for task_id in first_ids]
    assert max(positions) > min(served.index(i) for i in set(waiting) - first_ids - unanchored)


def test_open_task_counts_agree_with_label_studios(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    api: ApiServer,
    digits: Digits,
    tmp_path: Path,
) -> None:
    """Answered tasks leave "open"; a skipped one stays open (Label Studio serves it to another
    annotator) and a deleted answer reopens its task, in our counts as in Label Studio's. Before,
    label tasks never left "open": /queue counted every task ever handed off."""
    engine = sqlite_engine
    project = make_digits_project(engine, ls_settings, digits, tmp_path / "p", n_items=120)
    ls_project = connect(engine, project.name, label_studio, ls_settings)
    first_cycle(engine, project.name, ls_settings)
    tasks = tasks_of(engine, project.name)
    assert len(tasks) == 20
    answers = [
        annotator.annotate(int(task.external_task_id or 0), "other", modality="features")
        for task in tasks[:6]
    ]
    for task in tasks[6:8]:
        skipped = int(task.external_task_id or 0)
        annotator.annotate(skipped, None, modality="features", cancelled=True)
    for answer in answers[:2]:
        annotator.delete_annotation(answer)
    project_id = project_id_of(engine, project.name)
    wait_for(lambda: inbox_count(engine, project_id) == 10, what="10 webhooks")
    ingest_all(engine)
    total, finished = annotator.task_counts(ls_project)
    assert (total, finished) == (20, 4)
    with db.session_scope(engine) as session:
        status = queue_status(session, get_project(session, project.name))
    assert status.open_label_tasks == total - finished
    states = {int(t.external_task_id or 0): t.state for t in tasks_of(engine, project.name)}
    assert [states[int(t.external_task_id or 0)] for t in tasks[:8]] == [
        *[LabelTaskState.OPEN] * 2,  # answered, then deleted: open again
        *[LabelTaskState.ANSWERED] * 4,
        *[LabelTaskState.OPEN] * 2,  # skipped
    ]


def test_the_answer_that_leaves_the_queue_low_starts_the_next_cycle_at_once(
    sqlite_engine: sa.Engine,
    ls_settings: Settings,
    label_studio: LocalLabelStudio,
    annotator: LabelStudioGateway,
    api: ApiServer,
    digits: Digits,
    tmp_path: Path,
) -> None:
    """The ingest stage (what the `ingest` task runs for a webhook) asks for the next cycle
    itself: the first answer of a 20-task batch leaves 19 open, under the project's
    `refill_below` of one batch, and the cycle starts without waiting for beat. The answer is
    stored under the annotator's Label Studio email."""
    engine = sqlite_engine
    project = make_digits_project(engine, ls_settings, digits, tmp_path / "p", n_items=120)
    connect(engine, project.name, label_studio, ls_settings)
    first_cycle(engine, project.name, ls_settings)
    (task, *_) = tasks_of(engine, project.name)
    external = item_of(engine, task.item_id).external_id
    label = true_label(digits, external)
    annotator.annotate(int(task.external_task_id or 0), label, modality="features")
    project_id = project_id_of(engine, project.name)
    wait_for(lambda: inbox_count(engine, project_id) == 1, what="the webhook")
    with db.session_scope(engine) as session:
        pending = tuple(pending_events(session))
    off = ls_settings.model_copy(update={"start_due_cycles_at_once": False})
    assert run_step(engine, off, Step(Stage.INGEST, event_ids=pending)) == []
    with db.session_scope(engine) as session:
        stored = session.exec(select(Annotation).where(Annotation.item_id == task.item_id)).one()
    assert stored.annotator == annotator.whoami()  # the admin's email, not label-studio-user-1
    # The same answer ingested again (a redelivered message) starts the cycle now.
    (train,) = run_step(engine, ls_settings, Step(Stage.INGEST, event_ids=pending))
    assert train.stage == Stage.TRAIN
    with db.session_scope(engine) as session:
        started = session.get(Cycle, train.target)
        assert started is not None
        assert started.trigger == "queue low: 19 open tasks (refill below 20)"
    # While it runs, another answer starts nothing more.
    assert run_step(engine, ls_settings, Step(Stage.INGEST, event_ids=pending)) == []
