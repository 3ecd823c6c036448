"""The console's routes: sign-in, the projects list, a project's page, the JSON its script polls
for the live view, and the actions of write tokens. Pages are rendered on the server from the
templates beside this module; the one script (static/console.js) only refreshes what changes.
"""

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from services.api.console import figures
from services.api.console.actions import ACTIONS, ActionRequest
from services.api.console.auth import (
    COOKIE,
    COOKIE_MAX_AGE_S,
    COOKIE_PATH,
    SIGN_IN_PATH,
    ActorDep,
    CrossOrigin,
    ViewerDep,
    form_fields,
    from_own_origin,
    principal_of,
    visible_project,
)
from services.api.console.curve_cache import project_curve
from services.api.console.history import reliability_of
from services.api.console.tuning import heatmaps, studies_of
from services.api.deps import EngineDep, SessionDep, SettingsDep
from services.db import session_scope
from services.errors import Conflict, FocalloopError, InvalidInput, NotFound, TransientError
from services.overview import (
    dataset_versions,
    evaluation_items,
    glance,
    label_issues,
    live_cycle,
    newest_cycle,
    open_task_count,
)
from services.projects import get_project, list_projects
from services.status import queue_status

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
ProjectName = Annotated[str, PathParam(min_length=1, max_length=40)]
# Everything the console loads comes from this server; inline scripts and styles are refused
# too, so injected markup could not run even if escaping ever failed.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Frame-Options": "DENY",
    # Not no-referrer: with it Chromium sends "Origin: null" on our own form posts, which the
    # same-origin check must refuse.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

# How an action's failure is answered (the REST API's mapping, in app.py, for the same errors).
ERROR_STATUS: tuple[tuple[type[FocalloopError], int], ...] = (
    (NotFound, 404),
    (InvalidInput, 422),
    (Conflict, 409),
    (TransientError, 503),
)


def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(
        request, name, context, status_code=status, headers=PAGE_HEADERS
    )


def data(content: Any) -> JSONResponse:
    return JSONResponse(content, headers={"Cache-Control": "no-store"})


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


@router.get(SIGN_IN_PATH)
def sign_in_form(request: Request, engine: EngineDep) -> Response:
    if principal_of(engine, request.cookies.get(COOKIE)) is not None:
        return RedirectResponse("/console/", status_code=303)
    return page(request, "sign_in.html", {"error": None})


@router.post(SIGN_IN_PATH)
async def sign_in(request: Request, engine: EngineDep) -> Response:
    """Check the token and keep it in the console's cookie; a wrong token sets no cookie."""
    if not from_own_origin(request):
        raise CrossOrigin()
    secret = (await form_fields(request)).get("token", "").strip()
    principal = await run_in_threadpool(principal_of, engine, secret)
    if principal is None:
        return page(
            request,
            "sign_in.html",
            {"error": "That token is unknown, revoked or expired."},
            status=401,
        )
    response = RedirectResponse("/console/", status_code=303)
    response.set_cookie(
        COOKIE,
        secret,
        max_age=COOKIE_MAX_AGE_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/console/sign-out")
def sign_out(request: Request) -> Response:
    if not from_own_origin(request):
        raise CrossOrigin()
    response = RedirectResponse(SIGN_IN_PATH, status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return response


@router.get("/console/")
def projects_page(request: Request, session: SessionDep, viewer: ViewerDep) -> HTMLResponse:
    glances = [glance(session, p) for p in list_projects(session) if viewer.may_see(p)]
    return page(request, "projects.html", {"viewer": viewer, "glances": glances})


@router.get("/console/data/projects")
def projects_data(session: SessionDep, viewer: ViewerDep) -> JSONResponse:
    return data([glance(session, p).to_dict() for p in list_projects(session) if viewer.may_see(p)])


@router.get("/console/projects/{project}")
def project_page(
    request: Request,
    project: ProjectName,
    session: SessionDep,
    engine: EngineDep,
    viewer: ViewerDep,
    done: Annotated[str | None, Query(max_length=40)] = None,
) -> HTMLResponse:
    visible_project(engine, viewer, project)
    row = get_project(session, project)
    curve = project_curve(session, row)
    context = {
        "viewer": viewer,
        "project": row,
        "glance": glance(session, row),
        "models": list(reversed(curve.models)),
        "charts": curve.charts,
        "reliability": figures.reliability(reliability_of(session, row)),
        "queue": queue_status(session, row),
        "evaluation": evaluation_items(session, row),
        "issues": label_issues(session, row),
        "versions": dataset_versions(session, row),
        "studies": studies_of(engine, project),
        "actions": ACTIONS,
        "done": ACTIONS[done][0] if done in ACTIONS else None,
    }
    return page(request, "project.html", context)


@router.get("/console/data/projects/{project}/live")
def live_data(
    project: ProjectName, session: SessionDep, engine: EngineDep, viewer: ViewerDep
) -> JSONResponse:
    """What the project page refreshes: the newest cycle's stage and progress, open tasks."""
    visible_project(engine, viewer, project)
    row = get_project(session, project)
    cycle = newest_cycle(session, row)
    return data(
        {
            "paused": row.paused,
            "open_tasks": open_task_count(session, row),
            "cycle": live_cycle(cycle).to_dict() if cycle is not None else None,
        }
    )


@router.get("/console/data/projects/{project}/curve")
def curve_data(
    project: ProjectName, session: SessionDep, engine: EngineDep, viewer: ViewerDep
) -> JSONResponse:
    """The learning curve's points, one per model version (what the charts draw)."""
    visible_project(engine, viewer, project)
    row = get_project(session, project)
    return data([point.to_dict() for point in project_curve(session, row).models])


@router.get("/console/projects/{project}/tuning/{study}/heatmaps.png")
def tuning_heatmaps(
    project: ProjectName,
    study: Annotated[str, PathParam(min_length=1, max_length=80)],
    engine: EngineDep,
    viewer: ViewerDep,
) -> Response:
    visible_project(engine, viewer, project)
    return Response(heatmaps(engine, project, study), media_type="image/png")


@router.get("/console/projects/{project}/confirm/{action}")
def confirm_page(
    request: Request,
    project: ProjectName,
    action: Annotated[str, PathParam(max_length=40)],
    engine: EngineDep,
    viewer: ViewerDep,
    target: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> HTMLResponse:
    """The confirmation step of an action that asks for one (promote, roll back, cancel)."""
    visible_project(engine, viewer, project)
    if action not in ACTIONS:
        raise HTTPException(404, f"no console action {action!r}")
    if not viewer.can_act:
        raise HTTPException(403, "this needs a token with the write scope")
    with session_scope(engine) as session:
        project = get_project(session, project).name  # 404 for a project that does not exist
    title, _, _ = ACTIONS[action]
    return page(
        request,
        "confirm.html",
        {"viewer": viewer, "project": project, "action": action, "title": title, "target": target},
    )


@router.post("/console/projects/{project}/actions/{action}")
async def act(
    request: Request,
    project: ProjectName,
    action: Annotated[str, PathParam(max_length=40)],
    engine: EngineDep,
    settings: SettingsDep,
    actor: ActorDep,
) -> Response:
    """Run an action (write scope, from our own pages only) and return to the project page."""
    if action not in ACTIONS:
        raise HTTPException(404, f"no console action {action!r}")
    fields = await form_fields(request)
    await run_in_threadpool(visible_project, engine, actor, project)
    try:
        target = int(fields["target"]) if fields.get("target") else None
    except ValueError:
        raise HTTPException(422, "target must be a whole number") from None
    _, _, perform = ACTIONS[action]
    request_ = ActionRequest(
        engine, settings, request.app.state.celery, actor.principal, project, target
    )
    try:
        await run_in_threadpool(perform, request_)
    except FocalloopError as error:
        status = next((code for kind, code in ERROR_STATUS if isinstance(error, kind)), 500)
        return page(
            request,
            "error.html",
            {"viewer": actor, "project": project, "message": str(error)},
            status=status,
        )
    return RedirectResponse(
        f"/console/projects/{quote(project)}?done={quote(action)}", status_code=303
    )
