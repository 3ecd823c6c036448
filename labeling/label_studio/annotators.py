"""Annotators by name: Label Studio's webhooks name who answered only by user id, so before
ingesting (webhooks and reconciliation alike), the ids of the pending answers are looked up in
Label Studio's user list (once per user and process: emails rarely change) and each answer is
stored under its annotator's email. When Label Studio cannot be asked, the answer is stored
under `label-studio-user-<id>` rather than held back: a label matters more than its author's
display name. A failed lookup is not repeated for `RETRY_S`, so a Label Studio that is away
slows no ingest more than once a minute."""

import logging
import threading
import time
from collections.abc import Mapping

import sqlalchemy as sa
from sqlmodel import col, select

from labeling.label_studio.link import KIND, SOURCE, LabelStudioLink, gateway
from services.config import Settings
from services.db import session_scope
from services.errors import FocalloopError
from services.models import InboxEvent, Project

log = logging.getLogger(__name__)

RETRY_S = 60.0
# (Label Studio URL, user id) -> email: one process asks once per user.
_KNOWN: dict[tuple[str, int], str] = {}
# (Label Studio URL, user id) -> when to ask again: users the list lacked, or a failed lookup.
_RETRY_AT: dict[tuple[str, int], float] = {}
_LOCK = threading.Lock()


def _user_ids(payload: Mapping[str, object]) -> set[int]:
    raw = payload.get("annotation")
    ids = set()
    for annotation in raw if isinstance(raw, list) else [raw]:
        by = annotation.get("completed_by") if isinstance(annotation, Mapping) else None
        if isinstance(by, Mapping):
            by = by.get("id")
        if isinstance(by, int) and not isinstance(by, bool):
            ids.add(by)
    return ids


def pending_annotator_names(
    engine: sa.Engine, settings: Settings, *, limit: int = 10_000
) -> dict[int, dict[int, str]]:
    """Per project, Label Studio user id -> email, for the answers waiting to be ingested."""
    with session_scope(engine) as session:
        rows = session.exec(
            select(InboxEvent.project_id, InboxEvent.payload)
            .where(InboxEvent.source == SOURCE, col(InboxEvent.processed_at).is_(None))
            .limit(limit)
        ).all()
        wanted: dict[int, set[int]] = {}
        for project_id, payload in rows:
            if project_id is not None and isinstance(payload, Mapping):
                wanted.setdefault(project_id, set()).update(_user_ids(payload))
        links = {
            project.id or 0: LabelStudioLink.of(project)
            for project in session.exec(
                select(Project).where(col(Project.id).in_([p for p, ids in wanted.items() if ids]))
            ).all()
            if project.labeler.get("kind") == KIND
        }
    return {
        project_id: _names(link, wanted[project_id], settings) for project_id, link in links.items()
    }


def _names(link: LabelStudioLink, ids: set[int], settings: Settings) -> dict[int, str]:
    now = time.monotonic()
    with _LOCK:
        missing = {
            user
            for user in ids
            if (link.url, user) not in _KNOWN and _RETRY_AT.get((link.url, user), 0.0) <= now
        }
    if missing:
        try:
            users = gateway(link, settings).user_names()
        except FocalloopError as error:
            log.warning("could not read Label Studio's users (%s); names by user id", error)
            users = {}
        with _LOCK:
            _KNOWN.update(((link.url, user), name) for user, name in users.items())
            _RETRY_AT.update(((link.url, user), now + RETRY_S) for user in missing - set(users))
    with _LOCK:
        return {user: _KNOWN[(link.url, user)] for user in ids if (link.url, user) in _KNOWN}
