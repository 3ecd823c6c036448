"""Label Studio as a labeler: the only code that talks to Label Studio (through `gateway`, the
only importer of label_studio_sdk).

    link      a project's connection settings; `connect` sets Label Studio up for a project
    tasks     tasks as rows first: pending -> sent -> confirmed, reconciled by item id
    hand_off  a cycle's batch as tasks, hardest first, with the model's predictions
    media     presigned or signed links to the images tasks show
    events    webhook bodies into the inbox, and from the inbox into annotations
    sync      catching up with what webhooks missed (Label Studio never retries them)
    payloads  label configs, task and prediction payloads, annotation parsing (plain data)
    server    a local Label Studio in its own cached virtualenv (tests, `focalloop up`)
"""

import logging
from collections.abc import Sequence
from typing import ClassVar

import sqlalchemy as sa

from labeling.base import HandOffRefused, IngestReport, ReviewPolicy
from labeling.label_studio.annotators import pending_annotator_names
from labeling.label_studio.events import ingest_pending
from labeling.label_studio.hand_off import hand_off as hand_off_batch
from labeling.label_studio.link import KIND, SOURCE, LabelStudioLink, gateway
from labeling.label_studio.refresh import refresh_media_links
from labeling.label_studio.rejected import return_all_refused_answers, return_refused_answers
from labeling.label_studio.sync import sync_annotations
from labeling.label_studio.tasks import drop_unsent_tasks, push_pending
from services.config import Settings, get_settings
from services.db import session_scope
from services.errors import FocalloopError, InvalidInput
from services.models import Project
from services.projects import get_project

__all__ = ["KIND", "SOURCE", "LabelStudioLabeler"]
log = logging.getLogger(__name__)
CHECK_TIMEOUT_S = 3.0  # a readiness probe must answer well within a scraper's patience


class LabelStudioLabeler:
    """People answer in Label Studio; answers return by webhook and by beat's sync."""

    source: ClassVar[str] = SOURCE
    answers_later: ClassVar[bool] = True

    def hand_off(self, engine: sa.Engine, cycle_id: int, settings: Settings) -> list[int]:
        try:
            report = hand_off_batch(engine, cycle_id, settings)
        except InvalidInput as error:
            # Label Studio refused (a missing token, a deleted project): retrying cannot help.
            # Tasks never sent are dropped; the stage fails the cycle and frees its batch.
            with session_scope(engine) as session:
                drop_unsent_tasks(session, cycle_id)
            raise HandOffRefused(f"hand-off to Label Studio failed: {error}") from error
        log.info("cycle %s handed off to Label Studio: %s", cycle_id, report)
        return []

    def ingest(self, engine: sa.Engine, event_ids: Sequence[int]) -> IngestReport:
        # Every pending Label Studio event, not only these: one message per burst of webhooks.
        # (The labeler protocol passes no settings: the process's own reach Label Studio.)
        settings = get_settings()
        totals = ingest_pending(engine, names=pending_annotator_names(engine, settings))
        if totals.rejected:
            reopened = return_all_refused_answers(engine, settings)
            log.info("returned %d refused answers to Label Studio's annotators", reopened)
        return IngestReport(totals.stored, totals.duplicates, totals.rejected)

    def reconcile(self, engine: sa.Engine, project_name: str, settings: Settings) -> None:
        pushed = push_pending(engine, project_name, settings)
        if pushed.created or pushed.adopted:
            log.info("pushed %s's pending tasks to Label Studio: %s", project_name, pushed)
        report = sync_annotations(engine, project_name, settings)
        if report.new_revisions or report.withdrawn:
            log.info("synced %s with Label Studio: %s", project_name, report)
        with session_scope(engine) as session:
            project = get_project(session, project_name)
            session.expunge(project)
        try:
            reopened = return_refused_answers(engine, project, settings)
        except FocalloopError as error:  # Label Studio away: the next pass tries again
            log.warning("%s: refused answers not returned yet: %s", project_name, error)
            reopened = 0
        if reopened:
            log.info("reopened %d %s tasks whose answer was refused", reopened, project_name)
        renewed = refresh_media_links(engine, project_name, settings)
        if renewed:
            log.info("renewed the image links of %d open %s tasks", renewed, project_name)

    def review_policy(self, project: Project) -> ReviewPolicy | None:
        link = LabelStudioLink.of(project)
        return ReviewPolicy(threshold=link.review_threshold, per_cycle=link.reviews_per_cycle)

    def check(self, project: Project, settings: Settings) -> bool:
        quick = settings.model_copy(update={"label_studio_timeout_s": CHECK_TIMEOUT_S})
        gateway(LabelStudioLink.of(project), quick).whoami()
        return True
