"""The FastAPI application factory: the status and steering API (routes/), Label Studio's
webhook and the signed media links tasks carry, and the mapping of domain errors to HTTP codes.

The webhook only stores and enqueues: Label Studio waits about a second for an answer and never
retries, so the work (parsing, checking labels, updating items) happens in the `ingest` task,
and an event whose message was lost is picked up by `recover_stalled` from the inbox table.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import mimetypes
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated

import sqlalchemy as sa
from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from labeling.label_studio.events import store_webhook, webhook_project_id
from labeling.label_studio.link import webhook_secret
from labeling.label_studio.media import check_media_signature, media_origins
from services import logs
from services.api import console
from services.api.bodies import BodyLimit, json_object, read_capped, validation_problems
from services.api.docs import offline_app
from services.api.metrics import metrics_registry
from services.api.routes import (
    admin,
    cycles,
    datasets,
    model_backend,
    models,
    operations,
    projects,
    queue,
    tuning,
)
from services.api.schema_gate import SchemaGate
from services.api.schemas import Problem
from services.config import Settings
from services.cycle.flow import Stage, task_name
from services.datasets.sources import SourceReader, locate
from services.datasets.store import sha256_hex
from services.db import engine_from_settings, session_scope
from services.errors import Conflict, DeviceUnavailable, InvalidInput, NotFound, TransientError
from services.models import Item, Project

log = logging.getLogger(__name__)
INGEST_TASK = task_name(Stage.INGEST)
WEBHOOK_PATH = "/api/v1/webhooks/label-studio"


class WebhookAnswer(BaseModel):
    """outcome: stored (new event, ingest enqueued) | duplicate (already stored: nothing done)
    | ignored (an action focalloop does not use)."""

    outcome: str
    event_id: int | None = None


class IngestDoorbell:
    """Enqueues `ingest` for stored events: at most one message per `interval_s`, sent after
    the events it covers were committed. `ingest` drains every pending Label Studio event, so
    one message per burst is enough; a message that cannot be sent (broker down) leaves the
    events pending, and `recover_stalled` enqueues them."""

    def __init__(self, send: Callable[[list[int]], None], interval_s: float = 0.05) -> None:
        self._send = send
        self._interval_s = interval_s
        self._pending: list[int] = []
        self._scheduled = False

    def ring(self, event_id: int) -> None:
        self._pending.append(event_id)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self._interval_s, self._flush)

    def _flush(self) -> None:
        ids, self._pending, self._scheduled = self._pending, [], False
        if ids:
            asyncio.get_running_loop().run_in_executor(None, self._deliver, ids)

    def _deliver(self, ids: list[int]) -> None:
        try:
            self._send(ids)
        except Exception:
            # The events are stored; recover_stalled finds unprocessed ones and enqueues them.
            log.warning("could not enqueue ingest of %d events; recovery will", len(ids))

    def close(self) -> None:
        ids, self._pending = self._pending, []
        if ids:
            self._deliver(ids)


def create_app(settings: Settings, *, engine: sa.Engine | None = None) -> FastAPI:
    """The API for `settings`. `engine` lets tests and benchmarks share one."""
    from workers.app import create_app as create_celery  # the API only sends tasks

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.doorbell.close()
        if engine is None:
            app.state.engine.dispose()

    # /docs and /redoc from assets served here: FastAPI's own pages load them from a CDN, which
    # leaves a blank page without internet.
    app = offline_app(
        title="focalloop",
        version="0.1.0",
        description="Active-learning labeling loop: status, steering and Label Studio webhooks.",
        lifespan=lifespan,
    )
    app.state.settings = settings

    def body_limit(method: str, path: str) -> int | None:
        if path == WEBHOOK_PATH:
            return None  # capped by the route itself, which also counts what it refuses
        if method == "POST" and path.endswith("/predict"):
            return settings.predict_max_body_bytes
        return settings.api_max_body_bytes

    app.add_middleware(BodyLimit, limit_for=body_limit)
    app.state.engine = engine if engine is not None else engine_from_settings(settings)
    app.add_middleware(SchemaGate, engine=app.state.engine)
    app.state.metrics, webhook_outcomes = metrics_registry(app.state.engine)
    celery = create_celery(settings)
    app.state.celery = celery
    for router in (
        operations.router,
        projects.router,
        cycles.router,
        models.router,
        datasets.router,
        queue.router,
        admin.router,
        model_backend.router,
        tuning.router,
    ):
        app.include_router(router)
    console.install(app)
    app.state.doorbell = IngestDoorbell(
        lambda ids: celery.send_task(INGEST_TASK, args=[ids], queue="io", retry=False)
    )
    project_ids: dict[str, int] = {}  # webhook URL name -> id (projects are never renamed)

    @app.post(
        WEBHOOK_PATH,
        response_model=WebhookAnswer,
        tags=["labeling"],
        responses={
            400: {"model": Problem, "description": "the body is not a JSON object"},
            401: {"model": Problem, "description": "missing or wrong secret header"},
            404: {"model": Problem, "description": "no such project"},
            413: {"model": Problem, "description": "the body is too large"},
        },
    )
    async def label_studio_webhook(
        request: Request,
        project: Annotated[str, Query(min_length=3, max_length=40)],
        x_focalloop_secret: Annotated[str | None, Header()] = None,
    ) -> WebhookAnswer:
        """Store a Label Studio event (annotation created/updated/deleted) and enqueue its
        ingestion. The secret header is compared in constant time before the body is read."""
        try:
            answer = await receive(request, project, x_focalloop_secret)
        except HTTPException:
            webhook_outcomes.labels(outcome="rejected").inc()
            raise
        webhook_outcomes.labels(outcome=answer.outcome).inc()
        return answer

    async def receive(request: Request, project: str, secret: str | None) -> WebhookAnswer:
        try:
            expected = webhook_secret(settings)  # the one `connect` registered with
        except InvalidInput:
            expected = ""
        given = secret or ""
        if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(401, "missing or wrong X-Focalloop-Secret header")
        body = json_object(await read_capped(request, settings.webhook_max_body_bytes))

        def store() -> tuple[int | None, str]:
            # One autocommit statement: the event is durable when the answer goes out.
            with app.state.engine.connect().execution_options(
                isolation_level="AUTOCOMMIT"
            ) as connection:
                if project not in project_ids:
                    project_ids[project] = webhook_project_id(connection, project)
                return store_webhook(connection, project_ids[project], body)

        try:
            event_id, outcome = await run_in_threadpool(store)
        except NotFound as error:
            raise HTTPException(404, str(error)) from None
        except InvalidInput as error:
            raise HTTPException(400, str(error)) from None
        if event_id is not None:
            app.state.doorbell.ring(event_id)
        return WebhookAnswer(outcome=outcome, event_id=event_id)

    @app.get(
        "/api/v1/media/{project}/{item_id}",
        tags=["labeling"],
        response_class=Response,
        responses={
            200: {"content": {"image/*": {}}, "description": "the item's source bytes"},
            403: {"model": Problem, "description": "bad or expired signature"},
            404: {"model": Problem, "description": "no such item"},
            409: {"model": Problem, "description": "the source changed since registration"},
        },
    )
    def media(
        request: Request,
        project: str,
        item_id: int,
        expires: Annotated[int, Query()],
        signature: Annotated[str, Query(min_length=64, max_length=64)],
    ) -> Response:
        """An item's image as registered (its bytes checked against the pool's SHA-256), for a
        link signed by focalloop (what Label Studio tasks carry)."""
        try:
            check_media_signature(settings, project, item_id, expires, signature)
        except InvalidInput as error:
            raise HTTPException(403, str(error)) from None
        with session_scope(app.state.engine) as session:
            item = session.get(Item, item_id)
            owner = session.get(Project, item.project_id) if item is not None else None
            if item is None or owner is None or owner.name != project:
                raise HTTPException(404, f"no item {item_id} in project {project!r}")
            uri, content_hash = item.uri, item.content_hash
            origins = media_origins(owner, settings)
        # The uri was checked against the trusted roots when the item was registered; reading
        # it inside its own folder still refuses symlinks that lead elsewhere.
        folder = uri.rsplit("/", 1)[0]
        try:
            data = SourceReader(settings).read(locate(uri, [folder]))
        except NotFound as error:
            raise HTTPException(404, str(error)) from None
        if sha256_hex(data) != content_hash:
            raise HTTPException(409, "the source file changed since it was registered")
        media_type = mimetypes.guess_type(uri)[0] or "application/octet-stream"
        # The grant names the asking origin only when it is the project's Label Studio (never
        # '*'); Vary keeps a shared cache from handing one origin's answer to another.
        origin = request.headers.get("origin")
        granted = {"Access-Control-Allow-Origin": origin} if origin in origins else {}
        return Response(content=data, media_type=media_type, headers={"Vary": "Origin"} | granted)

    # Domain errors map to their HTTP codes here and only here; anything else is a 500.
    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_problems(error.errors())}, status_code=422)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, error: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=404)

    @app.exception_handler(InvalidInput)
    async def invalid(_: Request, error: InvalidInput) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(Conflict)
    async def conflict(_: Request, error: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=409)

    @app.exception_handler(TransientError)
    async def unavailable(_: Request, error: TransientError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(DeviceUnavailable)
    async def no_device(_: Request, error: DeviceUnavailable) -> JSONResponse:
        # The server's own configuration, not the request, is wrong: no retry will help.
        return JSONResponse({"detail": str(error)}, status_code=503)

    return app


def app_from_environment() -> FastAPI:
    """The app for `focalloop api` (uvicorn's factory): Settings from the environment."""
    from services.config import get_settings

    settings = get_settings()
    logs.configure(settings.log_level, fmt=settings.log_format, access_log=settings.access_log)
    app = create_app(settings)
    freeze_startup_objects()
    return app


def freeze_startup_objects() -> None:
    """Leave every object alive now (the imported modules, the app) out of garbage collection.

    The API imports torch, scikit-learn and SciPy (the model backend predicts in this process):
    about 560,000 tracked objects, which every full collection walked. One came about every
    20 console project-page views and added 330-410 ms to that view (gc.callbacks on
    `focalloop bench console`'s database); after freezing, the same collection took 65 ms.
    Frozen objects are still freed by reference counting; only reference cycles among them
    are never collected, and they are the process's own modules and app.
    """
    gc.collect()
    gc.freeze()
