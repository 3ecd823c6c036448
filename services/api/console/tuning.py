"""Tuning studies on the project page (`focalloop tune`), with their heatmaps. Neither opens
(or creates) Optuna's storage where no study was ever stored (`services.tuning.studies`)."""

import sqlalchemy as sa

from services.tuning.report import heatmaps_png
from services.tuning.studies import StudyStatus, list_studies, load, results


def studies_of(engine: sa.Engine, project: str) -> list[StudyStatus]:
    """The project's studies, newest first."""
    return list(reversed(list_studies(engine, project)))


def heatmaps(engine: sa.Engine, project: str, study: str) -> bytes:
    """The study's heatmaps as PNG (NotFound, or Conflict while it runs)."""
    return heatmaps_png(results(load(engine, project, study)))
