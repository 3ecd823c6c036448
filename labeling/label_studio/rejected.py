"""Answers focalloop refuses (a label outside the label set, no choice or several) go back to the
annotators in Label Studio, not only to our database: the refused answer is deleted there, which
reopens the task in "Label All Tasks", and the task's note (the header above the image) says
why. Run after an ingest that refused answers and on every reconciliation; repeating it changes
nothing (an answer already deleted is not found again).

Only the refused answer named in the item's `label_issue` is deleted, never another one on the
same task: an answer given since then is the annotator's correction.
"""

import logging
import re

import sqlalchemy as sa
from sqlmodel import col, select

from labeling.label_studio.link import KIND, LabelStudioLink, gateway
from labeling.label_studio.payloads import NOTE_KEY
from services.config import Settings
from services.db import session_scope
from services.errors import FocalloopError, InvalidInput
from services.models import Item, ItemStatus, LabelTask, LabelTaskState, Project

log = logging.getLogger(__name__)

# How events.apply_events words a refusal in the item's label_issue.
REFUSED = re.compile(r"^Label Studio annotation (\d+): (.*)$", re.DOTALL)


def refusal_note(reason: str) -> str:
    """The header an annotator sees on the reopened task."""
    return f"Your earlier answer could not be used: {reason.rstrip('. ')}. Please answer again."


def _refused(engine: sa.Engine, project: Project) -> list[tuple[int, int, str]]:
    """(Label Studio task, refused annotation, reason) of the project's open label tasks whose
    item's newest answer was refused."""
    with session_scope(engine) as session:
        rows = session.execute(
            sa.select(col(LabelTask.external_task_id), col(Item.label_issue))
            .join(Item, col(Item.id) == col(LabelTask.item_id))
            .where(
                col(LabelTask.project_id) == project.id,
                col(LabelTask.kind) == "label",
                col(LabelTask.state) == LabelTaskState.OPEN,
                col(LabelTask.external_task_id).is_not(None),
                col(Item.status) == ItemStatus.QUEUED,
                col(Item.label_issue).is_not(None),
            )
        ).all()
    refused = []
    for task_id, issue in rows:
        match = REFUSED.match(str(issue))
        if match is not None:
            refused.append((int(task_id), int(match.group(1)), match.group(2)))
    return refused


def return_refused_answers(engine: sa.Engine, project: Project, settings: Settings) -> int:
    """Reopen the project's tasks whose answer was refused; how many were reopened now."""
    refused = _refused(engine, project)
    if not refused:
        return 0
    remote = gateway(LabelStudioLink.of(project), settings)
    reopened = 0
    for task_id, annotation_id, reason in refused:
        try:
            task = remote.task(task_id)
            if not any(a.get("id") == annotation_id for a in task.get("annotations") or []):
                continue  # deleted already (by us, or by its annotator)
            data = dict(task.get("data") or {})
            remote.update_task_data(task_id, {**data, NOTE_KEY: refusal_note(reason)})
            remote.delete_annotation(annotation_id)
        except InvalidInput as error:
            # The task or answer is gone from Label Studio (404) or refused for good: nothing
            # to reopen there, and one such task must not hold the others back.
            log.warning("task %s: refused answer not returned: %s", task_id, error)
            continue
        reopened += 1
    return reopened


def return_all_refused_answers(engine: sa.Engine, settings: Settings) -> int:
    """`return_refused_answers` for every project connected to Label Studio; one project's
    unreachable Label Studio does not stop the others (reconciliation tries again)."""
    with session_scope(engine) as session:
        projects = [
            project
            for project in session.exec(select(Project).order_by(col(Project.id))).all()
            if project.labeler.get("kind") == KIND
        ]
        for project in projects:
            session.expunge(project)
    reopened = 0
    for project in projects:
        try:
            reopened += return_refused_answers(engine, project, settings)
        except FocalloopError as error:
            log.warning("%s: refused answers not returned yet: %s", project.name, error)
    return reopened
