"""The audit log: who triggered, promoted, rolled back, cancelled or changed tokens, and when.

Entries are written in the caller's transaction, so an action and its record commit together.
"""

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from services.models import AuditEntry


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    project_id: int | None = None,
    target: str = "",
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    entry = AuditEntry(
        actor=actor[:200],
        action=action,
        project_id=project_id,
        target=target[:400],
        detail=detail or {},
    )
    session.add(entry)
    session.flush()
    return entry


def list_entries(
    session: Session,
    *,
    project_id: int | None = None,
    only_project: bool = False,
    action: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
    before_id: int | None = None,
) -> list[AuditEntry]:
    """Newest first. `only_project` keeps entries of `project_id` alone (a project-restricted
    reader); otherwise `project_id` None means every entry."""
    statement = select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(limit)
    if project_id is not None or only_project:
        statement = statement.where(AuditEntry.project_id == project_id)
    if action is not None:
        statement = statement.where(AuditEntry.action == action)
    if since is not None:
        statement = statement.where(col(AuditEntry.at) >= since)
    if before_id is not None:
        statement = statement.where(col(AuditEntry.id) < before_id)
    return list(session.exec(statement).all())
