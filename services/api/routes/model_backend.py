"""focalloop as a Label Studio model backend (the protocol Label Studio 1.23 speaks to one, its
`ml/api_connector.py`): a project's Model settings take
`{api_url}/api/v1/projects/{project}/label-studio-backend` with basic auth (any user name, an
API token of the project as the password; read scope, write to start training).

    GET  /health   alive (Label Studio waits 1 s)
    POST /setup    the model version Label Studio should expect (its body carries the Label
                   Studio owner's API token: never stored nor logged)
    POST /predict  a prediction per task: `labeling.label_studio.model_backend`
    POST /webhook  "Start training" (action START_TRAINING) starts a cycle; the events Label
                   Studio also sends here are acknowledged and ignored (the project's own
                   webhook brings the answers)
    GET  /versions the model version served
"""

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from labeling.label_studio.model_backend import predict_tasks, serving_model
from services.api.bodies import json_object, read_capped
from services.api.deps import EngineDep, RequireBasic, SettingsDep
from services.api.routes.projects import ProjectName
from services.api.schemas import ERRORS
from services.audit import record
from services.auth import Principal
from services.db import session_scope
from services.models import Cycle, TokenScope
from services.projects import get_project
from workers.enqueue import start_and_enqueue

router = APIRouter(
    prefix="/api/v1/projects/{project}/label-studio-backend",
    tags=["label studio model backend"],
    responses=ERRORS,
)
BasicRead = Depends(RequireBasic(TokenScope.READ))
START_TRAINING = "START_TRAINING"
# The bodies are Label Studio's own (read to a cap and parsed by hand, as its webhooks are).
JSON_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the body is not a JSON object (or lacks what the call needs)"},
    413: {"description": "the body is too large"},
    415: {"description": "the body is not declared application/json"},
}


async def json_body(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object. Only `application/json` is read: Label Studio sends nothing
    else, and a page on another site can post a text or form body with credentials a browser
    remembered for basic auth, but not JSON without a CORS preflight we never grant."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise HTTPException(415, "send the body as application/json")
    return json_object(await read_capped(request, limit))


@router.get("/health")
def health(project: ProjectName, engine: EngineDep, _: Principal = BasicRead) -> dict[str, str]:
    with session_scope(engine) as session:
        get_project(session, project)  # 404 for a project that does not exist
    return {"status": "UP", "model_class": "focalloop"}


def _version(engine: Any, project: str) -> str:
    with session_scope(engine) as session:
        model = serving_model(session, get_project(session, project))
    return model.version if model is not None else ""


@router.post("/setup", responses=BODY_ERRORS, openapi_extra=JSON_BODY)
async def setup(
    request: Request,
    project: ProjectName,
    engine: EngineDep,
    settings: SettingsDep,
    _: Principal = BasicRead,
) -> dict[str, str]:
    """Label Studio's connection check; answers the model version it will find on our tasks.
    The body (which holds its owner's token) is read to the cap and dropped."""
    await json_body(request, settings.api_max_body_bytes)
    return {"model_version": await run_in_threadpool(_version, engine, project)}


@router.get("/versions")
def versions(project: ProjectName, engine: EngineDep, _: Principal = BasicRead) -> dict[str, Any]:
    version = _version(engine, project)
    return {"versions": [version] if version else []}


@router.post("/predict", responses=BODY_ERRORS, openapi_extra=JSON_BODY)
async def predict(
    request: Request,
    project: ProjectName,
    engine: EngineDep,
    settings: SettingsDep,
    _: Principal = BasicRead,
) -> dict[str, list[dict[str, Any]]]:
    """{"results": one prediction per task of the body's "tasks", in their order}."""
    body = await json_body(request, settings.predict_max_body_bytes)
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(task, dict) for task in tasks):
        raise HTTPException(400, '"tasks" must be a list of task objects')

    def answer() -> list[dict[str, Any]]:
        with session_scope(engine) as session:
            return predict_tasks(session, get_project(session, project), tasks, settings)

    return {"results": await run_in_threadpool(answer)}


@router.post(
    "/webhook",
    responses=BODY_ERRORS | {503: {"description": "the broker cannot take the training message"}},
    openapi_extra=JSON_BODY,
)
async def webhook(
    request: Request,
    project: ProjectName,
    engine: EngineDep,
    settings: SettingsDep,
    who: Principal = BasicRead,
) -> dict[str, Any]:
    """ "Start training" starts a cycle (a write token's; 409 while one runs); other actions
    are acknowledged and ignored."""
    body = await json_body(request, settings.api_max_body_bytes)
    if body.get("action") != START_TRAINING:
        return {"status": "ignored"}
    if not who.allows(TokenScope.WRITE):
        raise HTTPException(403, f"starting training needs the write scope ({who.scope})")

    def audit(session: Session, cycle: Cycle) -> None:
        record(
            session,
            actor=who.actor,
            action="cycle.start",
            project_id=cycle.project_id,
            target=f"cycle:{cycle.id}",
        )

    def start() -> Cycle:
        return start_and_enqueue(
            engine,
            settings,
            request.app.state.celery,
            project,
            trigger=f"label studio: Start training ({who.actor})",
            also=audit,
        )

    cycle = await run_in_threadpool(start)
    return {"status": "started", "cycle": cycle.number}
