"""The audit trail of the command line: the person at the terminal acts as `cli:<user>`, and
every command that changes state records what it did, as the API's routes do for theirs (a
test lists every command as read-only, store-only or audited, so a new one cannot be missed)."""

from __future__ import annotations

import getpass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlmodel import Session


def cli_actor() -> str:
    return f"cli:{getpass.getuser()}"


def audit_cli(
    session: Session,
    action: str,
    project: str,
    *,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Record `action` on `project` (by name) by the person at the terminal, in `session`'s
    transaction, so the entry exists exactly when the change does."""
    from services.audit import record
    from services.projects import get_project

    row = get_project(session, project)
    record(
        session,
        actor=cli_actor(),
        action=action,
        project_id=row.id,
        target=(target or row.name)[:400],  # the column's width
        detail=detail,
    )
