"""API tokens: creation (the secret shown once), lookup by bearer secret, revocation.

A token carries one scope (read < write < admin, each including the ones before it), may be
restricted to one project and may expire. Every change is written to the audit log in the same
transaction, so a token never exists without the record of who made it.
"""

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from services.audit import record
from services.db import lock_for_write
from services.errors import InvalidInput, NotFound
from services.models import SCOPE_ORDER, ApiToken, Project, TokenScope, utcnow
from services.projects import get_project

TOKEN_PREFIX = "flt_"


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a token secret (what the table stores and lookups compare)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_scope(scope: str) -> TokenScope:
    try:
        return TokenScope(scope)
    except ValueError:
        raise InvalidInput(
            f"unknown scope {scope!r}: use one of {[s.value for s in SCOPE_ORDER]}"
        ) from None


def scope_allows(granted: str, needed: TokenScope) -> bool:
    """Whether a token with scope `granted` may do what needs `needed`."""
    return SCOPE_ORDER.index(TokenScope(granted)) >= SCOPE_ORDER.index(needed)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's id, name, scope and project restriction (None = all)."""

    token_id: int
    name: str
    scope: TokenScope
    project_id: int | None

    @property
    def actor(self) -> str:
        return f"token:{self.token_id}:{self.name}"

    def allows(self, needed: TokenScope) -> bool:
        return scope_allows(self.scope, needed)


@dataclass(frozen=True)
class TokenView:
    """A token as listed (never its secret)."""

    id: int
    name: str
    scope: str
    project: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    created_by: str
    created_at: datetime
    last_used_at: datetime | None


def _view(session: Session, token: ApiToken) -> TokenView:
    project = session.get(Project, token.project_id) if token.project_id is not None else None
    return TokenView(
        id=token.id or 0,
        name=token.name,
        scope=token.scope,
        project=project.name if project is not None else None,
        expires_at=token.expires_at,
        revoked_at=token.revoked_at,
        created_by=token.created_by,
        created_at=token.created_at,
        last_used_at=token.last_used_at,
    )


def create_token(
    session: Session,
    *,
    name: str,
    scope: str,
    actor: str,
    project: str | None = None,
    expires_at: datetime | None = None,
) -> tuple[TokenView, str]:
    """A new token and its secret (returned once; only its hash is kept)."""
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise InvalidInput("a token name needs 1-100 characters")
    granted = parse_scope(scope)
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise InvalidInput("expires_at needs a time zone (e.g. 2027-01-01T00:00:00Z)")
        if expires_at <= utcnow():
            raise InvalidInput(f"expires_at {expires_at.isoformat()} is in the past")
    project_id = get_project(session, project).id if project is not None else None
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        name=name,
        token_hash=hash_secret(secret),
        scope=granted.value,
        project_id=project_id,
        expires_at=expires_at,
        created_by=actor,
    )
    session.add(token)
    session.flush()
    record(
        session,
        actor=actor,
        action="token.create",
        project_id=project_id,
        target=f"token:{token.id}",
        detail={"name": name, "scope": granted.value, "expires_at": _iso(expires_at)},
    )
    return _view(session, token), secret


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def list_tokens(session: Session, *, include_revoked: bool = False) -> list[TokenView]:
    statement = select(ApiToken).order_by(col(ApiToken.id))
    if not include_revoked:
        statement = statement.where(col(ApiToken.revoked_at).is_(None))
    return [_view(session, token) for token in session.exec(statement).all()]


def revoke_token(session: Session, token_id: int, *, actor: str) -> TokenView:
    """Revoke a token (kept for the record; it authenticates no more). Revoking twice is a
    no-op that writes nothing."""
    lock_for_write(session)
    token = session.exec(select(ApiToken).where(ApiToken.id == token_id).with_for_update()).first()
    if token is None:
        raise NotFound(f"no token with id {token_id}")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        session.add(token)
        session.flush()
        record(
            session,
            actor=actor,
            action="token.revoke",
            project_id=token.project_id,
            target=f"token:{token.id}",
            detail={"name": token.name},
        )
    return _view(session, token)


def authenticate(session: Session, secret: str) -> Principal | None:
    """The principal for a bearer secret, or None when it is unknown, revoked or expired."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        return None
    token = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_secret(secret))).first()
    if token is None or token.revoked_at is not None:
        return None
    now = utcnow()
    if token.expires_at is not None and token.expires_at <= now:
        return None
    return Principal(
        token_id=token.id or 0,
        name=token.name,
        scope=TokenScope(token.scope),
        project_id=token.project_id,
    )
