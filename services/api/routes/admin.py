"""API tokens (admin) and the audit log."""

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, status

from services.api.deps import AdminDep, ReadDep, SessionDep
from services.api.schemas import ERRORS, AuditPublic, TokenCreate, TokenCreated, TokenPublic
from services.audit import list_entries
from services.auth import TokenView, create_token, list_tokens, revoke_token
from services.models import Project
from services.projects import get_project

router = APIRouter(prefix="/api/v1", tags=["admin"], responses=ERRORS)


def _public(view: TokenView) -> TokenPublic:
    return TokenPublic.model_validate(view, from_attributes=True)


@router.post("/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create(body: TokenCreate, session: SessionDep, who: AdminDep) -> TokenCreated:
    """A new token; the response carries its secret, the only time it is shown."""
    view, secret = create_token(
        session,
        name=body.name,
        scope=body.scope,
        actor=who.actor,
        project=body.project,
        expires_at=body.expires_at,
    )
    return TokenCreated(**_public(view).model_dump(), token=secret)


@router.get("/tokens", response_model=list[TokenPublic])
def list_all(
    session: SessionDep,
    _: AdminDep,
    include_revoked: Annotated[bool, Query()] = False,
) -> list[TokenPublic]:
    return [_public(view) for view in list_tokens(session, include_revoked=include_revoked)]


@router.delete("/tokens/{token_id}", response_model=TokenPublic)
def revoke(
    token_id: Annotated[int, Path(ge=1, le=2**31 - 1)], session: SessionDep, who: AdminDep
) -> TokenPublic:
    """Revoke a token (it is kept, marked revoked; revoking twice changes nothing)."""
    return _public(revoke_token(session, token_id, actor=who.actor))


@router.get("/audit", response_model=list[AuditPublic])
def audit(
    session: SessionDep,
    who: ReadDep,
    project: Annotated[str | None, Query(max_length=40)] = None,
    action: Annotated[str | None, Query(max_length=60)] = None,
    since: Annotated[datetime | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> list[AuditPublic]:
    """Who did what, newest first. A project-restricted token sees its project's entries."""
    project_id = get_project(session, project).id if project is not None else None
    if who.project_id is not None:
        if project_id is not None and project_id != who.project_id:
            raise HTTPException(
                403, f"this token is restricted to another project than {project!r}"
            )
        project_id = who.project_id
    entries = list_entries(
        session,
        project_id=project_id,
        only_project=who.project_id is not None,
        action=action,
        since=since,
        limit=limit,
        before_id=before_id,
    )
    names: dict[int, str | None] = {}
    for entry in entries:
        if entry.project_id is not None and entry.project_id not in names:
            owner = session.get(Project, entry.project_id)
            names[entry.project_id] = owner.name if owner is not None else None
    return [
        AuditPublic(
            id=entry.id or 0,
            at=entry.at,
            actor=entry.actor,
            action=entry.action,
            project=names.get(entry.project_id) if entry.project_id is not None else None,
            target=entry.target,
            detail=entry.detail,
        )
        for entry in entries
    ]
