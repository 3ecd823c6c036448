"""The project page's learning curve and charts, kept per project until what they are drawn
from changes.

On a long history they were most of the page's time (200 models of 10 classes: reading and
decoding the summaries, 4,000 Wilson intervals and six SVG charts, about 90 ms of 180), yet
they change only when a model is recorded, promoted or rolled back, a dataset version is
committed, or the project's labels change. Every view reads the key (each model's version,
dataset version and promotion decision, each dataset version's row count, the labels: a few
milliseconds without the summaries) and rebuilds on any difference, so a view never shows an
older curve than the database holds, in whichever API process it lands. A model's summary and
metrics are written once, when it is recorded, so they need no place in the key.
"""

import threading
from collections.abc import Hashable
from dataclasses import dataclass

import sqlalchemy as sa
from markupsafe import Markup
from sqlmodel import Session, col

from services.api.console import figures
from services.api.console.history import ModelPoint, learning_curve
from services.models import DatasetVersion, ModelVersion, Project


@dataclass(frozen=True)
class ProjectCurve:
    """models: one point per model version, oldest first. charts: chart name -> SVG."""

    models: list[ModelPoint]
    charts: dict[str, Markup]


_lock = threading.Lock()
# project id -> (the key it was built from, what was built): one entry per project.
_built: dict[int, tuple[Hashable, ProjectCurve]] = {}


def _key(session: Session, project: Project) -> Hashable:
    models = session.execute(
        sa.select(
            col(ModelVersion.version),
            col(ModelVersion.dataset_version),
            col(ModelVersion.promotion),
            col(ModelVersion.promotion_reason),
        )
        .where(col(ModelVersion.project_id) == project.id)
        .order_by(col(ModelVersion.version))
    )
    datasets = session.execute(
        sa.select(col(DatasetVersion.version), col(DatasetVersion.row_count))
        .where(col(DatasetVersion.project_id) == project.id)
        .order_by(col(DatasetVersion.version))
    )
    return (
        tuple(project.labels),
        tuple(tuple(row) for row in models),
        tuple(tuple(row) for row in datasets),
    )


def _build(session: Session, project: Project) -> ProjectCurve:
    models = learning_curve(session, project)
    labels = list(project.labels)
    return ProjectCurve(
        models,
        {
            "macro_f1": figures.macro_f1_chart(models),
            "recall": figures.per_class_chart(models, labels, "recall"),
            "precision": figures.per_class_chart(models, labels, "precision"),
            "hardness": figures.hardness_chart(models),
            "focal": figures.focal_percentile_chart(models),
            "calibration": figures.calibration_chart(models),
        },
    )


def project_curve(session: Session, project: Project) -> ProjectCurve:
    """The project's learning curve and its charts, as the database holds them now.

    The key is read before the curve: a model recorded in between is drawn under the older key,
    and the next view, finding a different key, draws it again (never the other way round).
    """
    assert project.id is not None
    key = _key(session, project)
    with _lock:
        found = _built.get(project.id)
    if found is not None and found[0] == key:
        return found[1]
    built = _build(session, project)
    with _lock:
        _built[project.id] = (key, built)
    return built
