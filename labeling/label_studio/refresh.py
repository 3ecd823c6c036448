"""Image links in tasks expire (`media_url_ttl_s`, a day by default, so a leaked link stops
working soon). Reconciliation renews the link of every unanswered image task whose link has
less than half its lifetime left, so what an annotator opens still loads."""

import time
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import sqlalchemy as sa
from sqlmodel import col, select

from labeling.label_studio.link import LabelStudioLink, gateway
from labeling.label_studio.media import media_url
from labeling.label_studio.payloads import object_name
from services.config import Settings
from services.db import session_scope
from services.models import Item
from services.projects import get_project


def link_expiry(url: str) -> float | None:
    """Unix time a media link stops working: our signed links' `expires`, an S3 presigned URL's
    X-Amz-Date + X-Amz-Expires (SigV4) or Expires (SigV2); None when the URL says nothing."""
    query = {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}
    try:
        if "expires" in query:
            return float(query["expires"])
        if "X-Amz-Date" in query and "X-Amz-Expires" in query:
            signed = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            return signed.timestamp() + float(query["X-Amz-Expires"])
        if "Expires" in query:
            return float(query["Expires"])
    except ValueError:
        return None
    return None


def refresh_media_links(
    engine: sa.Engine, project_name: str, settings: Settings, *, now: float | None = None
) -> int:
    """Give every unanswered image task whose link expires within half a lifetime (or whose
    expiry cannot be read) a fresh link; returns how many were renewed."""
    now = time.time() if now is None else now
    with session_scope(engine) as session:
        project = get_project(session, project_name)
        if project.modality != "image":
            return 0
        link = LabelStudioLink.of(project)
    remote = gateway(link, settings)
    key = object_name("image")
    due = {
        task.item_id: task
        for task in remote.list_tasks(link.project_id)
        if task.item_id is not None
        and not task.annotations
        and isinstance(task.raw.get("data"), dict)
        and (link_expiry(str(task.raw["data"].get(key, ""))) or 0.0)
        < now + settings.media_url_ttl_s / 2
    }
    if not due:
        return 0
    with session_scope(engine) as session:
        items = session.exec(select(Item).where(col(Item.id).in_(sorted(due)))).all()
    for item in items:
        task = due[item.id or 0]
        fresh = media_url(project, item, link, settings)
        remote.update_task_data(task.task_id, {**task.raw["data"], key: fresh})
    return len(items)
