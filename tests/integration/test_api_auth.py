"""Every route's authentication and authorization, generated from `app.routes`: a route added
later is checked without anyone remembering to (an unlisted public route fails the test)."""

import base64
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlmodel import col, select

from services import db
from services.api.app import create_app
from services.auth import revoke_token
from services.config import Settings
from services.models import ApiToken, AuditEntry, utcnow
from services.projects import ProjectSpec, create_project
from tests.integration.api_harness import Api
from tests.integration.conftest import free_port

# Routes anyone may call, each for a reason: probes and the scrape carry no item data; the
# webhook and media links are authenticated by their own secret and signature.
PUBLIC = {
    ("GET", "/api/v1/health"),
    ("GET", "/api/v1/ready"),
    ("GET", "/metrics"),
    ("POST", "/api/v1/webhooks/label-studio"),
    ("GET", "/api/v1/media/{project}/{item_id}"),
    # FastAPI's own documentation routes (the schema is not a secret).
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/redoc-assets/redoc.standalone.js"),
    # The console's way in: a redirect to it, and its sign-in form.
    ("GET", "/"),
    ("GET", "/console/sign-in"),
    ("POST", "/console/sign-in"),
    ("POST", "/console/sign-out"),
}
# The console's pages and actions take the token from the console's cookie, not a header
# (tests/integration/test_console.py covers scopes and origins); without it they refuse.
CONSOLE = "/console/"
# Exceptions to "GET needs read, anything else needs write".
SCOPE = {
    ("POST", "/api/v1/projects/{project}/predict"): "read",  # computes, changes nothing
    ("POST", "/api/v1/tokens"): "admin",
    ("GET", "/api/v1/tokens"): "admin",
    ("DELETE", "/api/v1/tokens/{token_id}"): "admin",
}
# Routes no project-restricted token may call, whatever its scope.
UNRESTRICTED_ONLY = {
    ("POST", "/api/v1/projects"),
    ("POST", "/api/v1/tokens"),
    ("GET", "/api/v1/tokens"),
    ("DELETE", "/api/v1/tokens/{token_id}"),
}
LOWER = {"read": None, "write": "read", "admin": "write"}
# Label Studio's model backend: the token is basic auth's password (what Label Studio sends).
# Its POSTs need read: they compute or acknowledge; "Start training" checks write itself.
BASIC_AUTH = "/label-studio-backend/"
SCOPE |= {
    ("POST", f"/api/v1/projects/{{project}}{BASIC_AUTH}{name}"): "read"
    for name in ("setup", "predict", "webhook")
}


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[Api]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    db.upgrade(engine)
    settings = settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens
    )
    with db.session_scope(engine) as session:
        for name in ("alpha", "beta"):
            create_project(
                session,
                ProjectSpec(
                    name=name,
                    labels=["a", "b"],
                    modality="features",
                    store_url=f"file://{tmp_path / name}",
                ),
            )
    with TestClient(create_app(settings, engine=engine)) as client:
        yield Api(client, engine)
    engine.dispose()


def _flatten(routes: list[Any]) -> Iterator[Any]:
    """Every endpoint route: FastAPI keeps included routers as nested route objects."""
    for route in routes:
        nested = getattr(route, "original_router", None) or getattr(route, "router", None)
        if nested is not None and hasattr(nested, "routes"):
            yield from _flatten(nested.routes)
        else:
            yield route


def routes() -> list[tuple[str, str]]:
    """(method, path) of every route of the app, from `app.routes`."""
    app = create_app(Settings(database_url="sqlite://"))
    found = []
    for route in _flatten(list(app.routes)):
        if not hasattr(route, "methods"):
            continue  # a static files mount: the docs' and the console's assets
        path = route.path
        for method in sorted(set(route.methods or ()) - {"HEAD", "OPTIONS"}):
            found.append((method, path))
            assert isinstance(route, APIRoute) or (method, path) in PUBLIC
    return found


ROUTES = routes()
COOKIE_ROUTES = [r for r in ROUTES if r not in PUBLIC and r[1].startswith(CONSOLE)]
PROTECTED = [r for r in ROUTES if r not in PUBLIC and r not in COOKIE_ROUTES]


def needed(method: str, path: str) -> str:
    return SCOPE.get((method, path), "read" if method == "GET" else "write")


def url(path: str) -> str:
    """The path with placeholder ids (the project "alpha" exists)."""
    path = path.replace("{project}", "alpha").replace("{item_id:path}", "x")
    return re.sub(r"\{[a-z_]+\}", "1", path)


def call(api: Api, method: str, path: str, headers: dict[str, str]) -> int:
    given = headers.get("Authorization", "")
    if BASIC_AUTH in path and given.startswith("Bearer "):
        secret = base64.b64encode(f"label-studio:{given.removeprefix('Bearer ')}".encode())
        headers = {"Authorization": f"Basic {secret.decode()}"}
    status: int = api.client.request(method, url(path), headers=headers, json={}).status_code
    return status


def test_the_public_routes_are_exactly_the_listed_ones() -> None:
    assert set(ROUTES) >= PUBLIC
    assert len(PROTECTED) >= 25


@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=[f"{m} {p}" for m, p in PROTECTED])
def test_every_protected_route_refuses_missing_wrong_and_weak_tokens(
    api: Api, method: str, path: str
) -> None:
    assert call(api, method, path, {}) == 401
    assert call(api, method, path, {"Authorization": "Bearer flt_not-a-token"}) == 401
    assert call(api, method, path, {"Authorization": "Basic YTpi"}) == 401
    scope = needed(method, path)
    weaker = LOWER[scope]
    if weaker is not None:
        assert call(api, method, path, api.headers(weaker)) == 403
    elsewhere = api.headers("admin", project="beta")
    if (method, path) in UNRESTRICTED_ONLY or "{project}" in path:
        assert call(api, method, path, elsewhere) == 403
    # The right scope gets past authorization (whatever the placeholder ids then answer).
    assert call(api, method, path, api.headers(scope)) not in (401, 403)


@pytest.mark.parametrize(
    ("method", "path"), COOKIE_ROUTES, ids=[f"{m} {p}" for m, p in COOKIE_ROUTES]
)
def test_every_console_route_refuses_without_its_cookie(api: Api, method: str, path: str) -> None:
    origin = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    for headers in ({}, api.headers("admin"), {"Cookie": "focalloop_console=flt_wrong"}):
        answer = api.client.request(
            method, url(path), headers=headers | origin, follow_redirects=False
        )
        if path.startswith(f"{CONSOLE}data/"):
            assert answer.status_code == 401
        else:
            assert (answer.status_code, answer.headers["location"]) == (303, "/console/sign-in")


def test_a_project_token_reaches_its_own_project_only(api: Api) -> None:
    mine = api.headers("write", project="alpha")
    assert api.client.get("/api/v1/projects/alpha", headers=mine).status_code == 200
    assert api.client.get("/api/v1/projects/beta", headers=mine).status_code == 403
    listed = api.client.get("/api/v1/projects", headers=mine).json()
    assert [p["name"] for p in listed] == ["alpha"]
    assert api.client.post("/api/v1/projects/alpha/pause", headers=mine).status_code == 200
    other_audit = api.client.get("/api/v1/audit", params={"project": "beta"}, headers=mine)
    assert other_audit.status_code == 403
    own_audit = api.client.get("/api/v1/audit", headers=mine).json()
    assert [(e["action"], e["project"]) for e in own_audit] == [
        ("project.pause", "alpha"),
        ("token.create", "alpha"),  # the making of this very token
    ]


def test_expired_and_revoked_tokens_stop_working(api: Api) -> None:
    soon = api.token("read", expires_at=utcnow() + timedelta(seconds=60))
    headers = {"Authorization": f"Bearer {soon}"}
    assert api.client.get("/api/v1/projects", headers=headers).status_code == 200
    with db.session_scope(api.engine) as session:
        row = session.exec(select(ApiToken).order_by(col(ApiToken.id).desc())).first()
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
        session.add(row)
    assert api.client.get("/api/v1/projects", headers=headers).status_code == 401

    kept = api.token("read", name="to-revoke")
    headers = {"Authorization": f"Bearer {kept}"}
    assert api.client.get("/api/v1/projects", headers=headers).status_code == 200
    with db.session_scope(api.engine) as session:
        row = session.exec(select(ApiToken).where(ApiToken.name == "to-revoke")).one()
        revoke_token(session, row.id or 0, actor="test")
    assert api.client.get("/api/v1/projects", headers=headers).status_code == 401


def test_tokens_are_managed_by_admins_and_every_change_is_audited(api: Api) -> None:
    admin = api.headers("admin")
    created = api.client.post(
        "/api/v1/tokens",
        headers=admin,
        json={"name": "ci", "scope": "read", "project": "alpha"},
    )
    assert created.status_code == 201
    body = created.json()
    secret, token_id = body["token"], body["id"]
    assert (body["scope"], body["project"]) == ("read", "alpha")
    with db.session_scope(api.engine) as session:
        stored = session.get(ApiToken, token_id)
        assert stored is not None and secret not in stored.token_hash  # only the hash is kept
    listed = api.client.get("/api/v1/tokens", headers=admin).json()
    assert "token" not in listed[0] and token_id in [t["id"] for t in listed]
    used = {"Authorization": f"Bearer {secret}"}
    assert api.client.get("/api/v1/projects/alpha", headers=used).status_code == 200
    assert api.client.delete(f"/api/v1/tokens/{token_id}", headers=admin).status_code == 200
    assert api.client.delete(f"/api/v1/tokens/{token_id}", headers=admin).status_code == 200
    assert api.client.delete("/api/v1/tokens/999999", headers=admin).status_code == 404
    assert api.client.get("/api/v1/projects/alpha", headers=used).status_code == 401
    bad = api.client.post("/api/v1/tokens", headers=admin, json={"name": "x", "scope": "root"})
    assert bad.status_code == 422
    past = api.client.post(
        "/api/v1/tokens",
        headers=admin,
        json={"name": "x", "scope": "read", "expires_at": "2001-01-01T00:00:00Z"},
    )
    assert (past.status_code, "in the past" in past.json()["detail"]) == (422, True)
    with db.session_scope(api.engine) as session:
        entries = session.exec(
            select(AuditEntry.action, AuditEntry.target).where(
                AuditEntry.target == f"token:{token_id}"
            )
        ).all()
    assert sorted(entries) == [
        ("token.create", f"token:{token_id}"),
        ("token.revoke", f"token:{token_id}"),
    ]
