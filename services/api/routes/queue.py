"""The labeling queue: what waits in Label Studio, labels since the last version, annotators."""

from typing import Annotated

from fastapi import APIRouter, Query

from services.api.deps import ReadDep, SessionDep
from services.api.routes.projects import ProjectName
from services.api.schemas import (
    ERRORS,
    AgreementPublic,
    AnnotatorPublic,
    QueuedTaskPublic,
    QueuePublic,
    RejectedEventPublic,
)
from services.projects import get_project
from services.status import queue_status

router = APIRouter(prefix="/api/v1/projects/{project}", tags=["queue"], responses=ERRORS)


@router.get("/queue", response_model=QueuePublic)
def queue(
    project: ProjectName,
    session: SessionDep,
    _: ReadDep,
    hardest: Annotated[int, Query(ge=0, le=500, description="How many open tasks to list.")] = 20,
) -> QueuePublic:
    """Items selected and queued, open label tasks (hardest first), label-noise reviews
    pending, labels since the last dataset version, annotator throughput and agreement, and
    the labeling-tool events ingest set aside with their reasons."""
    status = queue_status(session, get_project(session, project), hardest=hardest)
    return QueuePublic(
        selected=status.selected,
        queued=status.queued,
        open_label_tasks=status.open_label_tasks,
        reviews_pending=status.reviews_pending,
        labels_since_last_version=status.labels_since_last_version,
        last_version=status.last_version,
        annotators=[
            AnnotatorPublic.model_validate(a, from_attributes=True) for a in status.annotators
        ],
        agreement=AgreementPublic.model_validate(status.agreement, from_attributes=True),
        hardest=[QueuedTaskPublic.model_validate(t, from_attributes=True) for t in status.hardest],
        rejected_events=status.rejected_events,
        recent_rejections=[
            RejectedEventPublic.model_validate(r, from_attributes=True)
            for r in status.recent_rejections
        ],
    )
