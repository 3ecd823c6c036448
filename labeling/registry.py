"""Labelers by name: `Project.labeler["kind"]` (and an inbox event's source) -> implementation.
A new labeler is a package of its own and one line in `LABELERS`."""

import logging
from collections.abc import Callable

import sqlalchemy as sa
from sqlmodel import select

from labeling.base import Labeler, NoLabeler
from labeling.label_studio import LabelStudioLabeler
from labeling.simulated import SimulatedLabeler
from services.config import Settings
from services.db import session_scope
from services.errors import FocalloopError, InvalidInput
from services.models import Project

log = logging.getLogger(__name__)

LABELERS: dict[str, Callable[[], Labeler]] = {
    "none": NoLabeler,
    "simulated": SimulatedLabeler,
    "label_studio": LabelStudioLabeler,
}


def labeler_for(project: Project) -> Labeler:
    """The project's labeler; InvalidInput for a kind no implementation is registered for."""
    kind = str(project.labeler.get("kind", "none"))
    if kind not in LABELERS:
        raise InvalidInput(f"project {project.name!r} has an unknown labeler kind {kind!r}")
    return LABELERS[kind]()


def answers_later(project: Project) -> bool:
    """Whether people answer the project's hand-offs later, from a queue (False for a kind no
    implementation is registered for: it has no queue to keep filled)."""
    make = LABELERS.get(str(project.labeler.get("kind", "none")))
    return make is not None and make().answers_later


def labeler_of_source(source: str) -> Labeler | None:
    """The labeler whose answers carry this inbox source (None when no labeler does)."""
    for make in LABELERS.values():
        labeler = make()
        if labeler.source == source:
            return labeler
    return None


def reconcile_all(engine: sa.Engine, settings: Settings) -> None:
    """Every project's labeler catches up with its tool (beat, on its interval). One project's
    failure is logged and does not stop the others."""
    with session_scope(engine) as session:
        projects = list(session.exec(select(Project).order_by(Project.name)).all())
    for project in projects:
        try:
            labeler_for(project).reconcile(engine, project.name, settings)
        except FocalloopError:
            log.exception("reconciling %s with its labeling tool failed", project.name)
