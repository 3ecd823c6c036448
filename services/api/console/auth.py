"""Signing in to the console: an API token given once through a form, then kept in a cookie of
the console's own (HttpOnly, so page scripts cannot read it; SameSite=Strict, so other sites'
pages do not send it; Path=/console, so the REST API never sees it) and never put in a URL.

Cookies ignore ports, so a page on another port of the same host would carry the cookie too:
every state-changing request must also come from our own origin (Sec-Fetch-Site and Origin, both
set by the browser and not settable by page scripts).
"""

from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

import sqlalchemy as sa
from fastapi import Depends, HTTPException, Request
from sqlmodel import select

from services.api.deps import EngineDep, authenticated
from services.auth import Principal
from services.db import session_scope
from services.models import Project, TokenScope

COOKIE = "focalloop_console"
COOKIE_PATH = "/console"
COOKIE_MAX_AGE_S = 12 * 3600
SIGN_IN_PATH = "/console/sign-in"
MAX_FORM_BYTES = 4096


class SignInRequiredError(Exception):
    """No valid console cookie: pages redirect to the sign-in form, data answers 401."""


class CrossOrigin(HTTPException):
    """403 for a state-changing request that did not come from one of the console's pages."""

    def __init__(self) -> None:
        super().__init__(403, "refused: this request did not come from a page of this console")


def from_own_origin(request: Request) -> bool:
    """Whether a state-changing request was sent by one of our own pages. Browsers send
    Sec-Fetch-Site (same-origin only when scheme, host and port match) and Origin on every
    POST; a request with neither is not from a browser page and is refused too, since only
    a browser carries the cookie without being asked to."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return site == "same-origin"
    # The Host header, not our idea of our address: behind a proxy it is what the browser used.
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def form_fields(request: Request) -> dict[str, str]:
    """A small urlencoded form's fields (the first value of each); larger bodies are refused."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(413, "the form is too large")
    try:
        pairs = parse_qs(body.decode(), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "the form could not be read") from None
    return {key: values[0] for key, values in pairs.items()}


def principal_of(engine: sa.Engine, secret: str | None) -> Principal | None:
    return authenticated(engine, secret) if secret else None


@dataclass(frozen=True)
class Viewer:
    """Who is looking at the console, and what they may do."""

    principal: Principal

    @property
    def can_act(self) -> bool:
        return self.principal.allows(TokenScope.WRITE)

    def may_see(self, project: Project) -> bool:
        return self.principal.project_id is None or self.principal.project_id == project.id


def get_viewer(request: Request, engine: EngineDep) -> Viewer:
    principal = principal_of(engine, request.cookies.get(COOKIE))
    if principal is None:
        raise SignInRequiredError()
    return Viewer(principal)


def get_actor(request: Request, viewer: Annotated[Viewer, Depends(get_viewer)]) -> Viewer:
    """The viewer of a state-changing request: from our own origin and with a write token."""
    if not from_own_origin(request):
        raise CrossOrigin()
    if not viewer.can_act:
        raise HTTPException(
            403, f"this needs a token with the write scope ({viewer.principal.scope})"
        )
    return viewer


def visible_project(engine: sa.Engine, viewer: Viewer, name: str) -> None:
    """403 when the viewer's token is restricted to another project, whether `name` exists or
    not (a 404 would tell a restricted token which names exist); 404s for unrestricted tokens
    stay the routes'."""
    restricted_to = viewer.principal.project_id
    if restricted_to is None:
        return
    with session_scope(engine) as session:
        project_id = session.exec(select(Project.id).where(Project.name == name)).first()
    if project_id != restricted_to:
        raise HTTPException(403, f"this token is restricted to another project than {name!r}")


ViewerDep = Annotated[Viewer, Depends(get_viewer)]
ActorDep = Annotated[Viewer, Depends(get_actor)]
