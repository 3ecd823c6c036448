"""Typed dependencies of the API: settings, the database session, and the caller's token.

Every route declares the scope it needs (`ReadDep`, `WriteDep`, `AdminDep`); a token restricted
to a project may only reach routes of that project (a `{project}` path parameter), and only an
unrestricted admin token manages tokens. 401 = no valid token, 403 = a valid token that may not
do this.
"""

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, HTTPException, Request
from fastapi.security import (
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)
from sqlmodel import Session, select

from services.auth import Principal, authenticate
from services.config import Settings
from services.db import session_scope
from services.models import ApiToken, Project, TokenScope, utcnow

bearer = HTTPBearer(
    auto_error=False,
    description="An API token from `focalloop token create` (scopes: read, write, admin).",
)
# Label Studio authenticates to a model backend with basic auth only (its 1.23 choices: none or
# basic), so the model-backend routes take the token as the password.
basic = HTTPBasic(
    auto_error=False,
    realm="focalloop",
    description="Label Studio's model-backend connection: any user name, an API token as the "
    "password.",
)
# last_used_at is written at most this often per token, so reads stay read-only in the common case.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> sa.Engine:
    engine: sa.Engine = request.app.state.engine
    return engine


def get_session(engine: Annotated[sa.Engine, Depends(get_engine)]) -> Iterator[Session]:
    """One transaction per request: committed when the route returns, rolled back on error."""
    with session_scope(engine) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[sa.Engine, Depends(get_engine)]
SessionDep = Annotated[Session, Depends(get_session)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def get_principal(
    engine: EngineDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    if credentials is None:
        raise _unauthorized("an API token is required: Authorization: Bearer <token>")
    return _principal(engine, credentials.credentials, _unauthorized)


def _unauthorized_basic(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": 'Basic realm="focalloop"'})


def get_basic_principal(
    engine: EngineDep, credentials: Annotated[HTTPBasicCredentials | None, Depends(basic)]
) -> Principal:
    if credentials is None:
        raise _unauthorized_basic("basic auth is required: any user name, an API token as password")
    return _principal(engine, credentials.password, _unauthorized_basic)


def authenticated(engine: sa.Engine, secret: str) -> Principal | None:
    """The principal of `secret` (None: unknown, revoked or expired), its use noted on the
    token (for the API's headers and the console's cookie alike)."""
    with session_scope(engine) as session:
        principal = authenticate(session, secret)
        if principal is None:
            return None
        token = session.exec(select(ApiToken).where(ApiToken.id == principal.token_id)).one()
        now = utcnow()
        if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
            token.last_used_at = now
            session.add(token)
    return principal


def _principal(
    engine: sa.Engine, secret: str, unauthorized: Callable[[str], HTTPException]
) -> Principal:
    principal = authenticated(engine, secret)
    if principal is None:
        raise unauthorized("the API token is unknown, revoked or expired")
    return principal


class Require:
    """A dependency: the caller's token must hold `scope`; with `unrestricted`, it must not be
    limited to one project (token management, creating projects)."""

    def __init__(self, scope: TokenScope, *, unrestricted: bool = False) -> None:
        self.scope = scope
        self.unrestricted = unrestricted

    def __call__(
        self,
        request: Request,
        engine: EngineDep,
        principal: Annotated[Principal, Depends(get_principal)],
    ) -> Principal:
        return self.check(request, engine, principal)

    def check(self, request: Request, engine: sa.Engine, principal: Principal) -> Principal:
        if not principal.allows(self.scope):
            raise HTTPException(
                403, f"this needs a token with the {self.scope.value} scope ({principal.scope})"
            )
        if principal.project_id is None:
            return principal
        if self.unrestricted:
            raise HTTPException(403, "this needs a token that is not restricted to one project")
        name = request.path_params.get("project")
        if name is not None:
            with session_scope(engine) as session:
                project_id = session.exec(select(Project.id).where(Project.name == name)).first()
            if project_id != principal.project_id:
                raise HTTPException(
                    403, f"this token is restricted to another project than {name!r}"
                )
        return principal


class RequireBasic(Require):
    """`Require`, the token given as basic auth's password (Label Studio's model backend)."""

    def __call__(
        self,
        request: Request,
        engine: EngineDep,
        principal: Annotated[Principal, Depends(get_basic_principal)],
    ) -> Principal:
        return self.check(request, engine, principal)


ReadDep = Annotated[Principal, Depends(Require(TokenScope.READ))]
WriteDep = Annotated[Principal, Depends(Require(TokenScope.WRITE))]
CreateDep = Annotated[Principal, Depends(Require(TokenScope.WRITE, unrestricted=True))]
AdminDep = Annotated[Principal, Depends(Require(TokenScope.ADMIN, unrestricted=True))]
