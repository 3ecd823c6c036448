"""Tuning studies on the project page (`focalloop tune`), with their heatmaps.

Optuna's storage is opened only where a study was ever stored: opening it costs a connection
and a schema check, which a deployment that never tuned should not pay on every page view.
"""

import sqlalchemy as sa

from services.tuning.report import heatmaps_png
from services.tuning.studies import StudyStatus, list_studies, load, results
from services.tuning.study import storage_exists


def studies_of(engine: sa.Engine, project: str) -> list[StudyStatus]:
    """The project's studies, newest first ([] when none was ever stored)."""
    if not storage_exists(engine):
        return []
    return list(reversed(list_studies(engine, project)))


def heatmaps(engine: sa.Engine, project: str, study: str) -> bytes:
    """The study's heatmaps as PNG (NotFound, or Conflict while it runs)."""
    return heatmaps_png(results(load(engine, project, study)))
