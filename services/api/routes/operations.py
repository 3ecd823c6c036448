"""Liveness, readiness and Prometheus metrics: the probes and the scrape need no token (they
carry status and aggregate counts only, never item data)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from services.api.deps import EngineDep, SettingsDep
from services.api.schemas import CheckPublic, ReadyPublic
from services.auth import authenticate
from services.db import session_scope
from services.readiness import (
    check_broker,
    check_database,
    check_labelers,
    check_stores,
    check_workers,
)

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: str


@router.get("/api/v1/health", response_model=Health)
def health() -> Health:
    """Liveness: the process answers (no dependency is checked, no auth)."""
    return Health(status="ok")


@router.get(
    "/api/v1/ready",
    response_model=ReadyPublic,
    responses={503: {"model": ReadyPublic, "description": "a dependency is not ready"}},
)
async def ready(request: Request, engine: EngineDep, settings: SettingsDep) -> JSONResponse:
    """Readiness: the database and its schema, the broker (Redis), a worker heard from on
    every queue, every project's dataset store taking a write, every project's labeling tool;
    503 when any fails. Without a valid token only `ready` is answered (the checks name hosts
    and ports); with one, every check with its reason. (The token is read by hand, not
    declared: the route is open to every caller and its schema says so.)"""
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    secret = secret.strip() if scheme.lower() == "bearer" else ""

    def run() -> ReadyPublic:
        checks = {"database": check_database(engine), "broker": check_broker(settings)}
        shown = False
        if checks["database"].ok:
            with session_scope(engine) as session:
                checks["workers"] = check_workers(session, settings)
                checks["store"] = check_stores(session, settings)
                checks["labelers"] = check_labelers(session, settings)
                shown = bool(secret) and authenticate(session, secret) is not None
        return ReadyPublic(
            ready=all(check.ok for check in checks.values()),
            checks={k: CheckPublic(ok=v.ok, detail=v.detail) for k, v in checks.items()}
            if shown
            else None,
        )

    answer = await run_in_threadpool(run)
    return JSONResponse(
        answer.model_dump(exclude_none=True), status_code=200 if answer.ready else 503
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus exposition: cycles, scoring throughput, queue depth, the current model's
    per-class recall and hard-example rate, labels, webhook outcomes."""
    body = await run_in_threadpool(generate_latest, request.app.state.metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
