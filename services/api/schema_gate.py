"""An API started before `focalloop db upgrade` says so: while the database's schema is not the
one this code needs, every route but liveness answers 503 naming the command to run, instead of
500s from missing tables. The schema is checked again at most every `recheck_s` until it is
current, so the API needs no restart after the upgrade."""

import time

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from services.db import schema_problem

# Liveness stays 200: restarting the process would not migrate the database.
UNGATED = frozenset({"/api/v1/health"})


class SchemaGate:
    def __init__(self, app: ASGIApp, *, engine: sa.Engine, recheck_s: float = 2.0) -> None:
        self.app = app
        self.engine = engine
        self.recheck_s = recheck_s
        self.current = False
        self.problem: str | None = None
        self.checked_at = float("-inf")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.current or scope["type"] != "http" or scope["path"] in UNGATED:
            await self.app(scope, receive, send)
            return
        problem = await self._problem()
        if problem is None:
            await self.app(scope, receive, send)
            return
        await JSONResponse({"detail": problem}, status_code=503)(scope, receive, send)

    async def _problem(self) -> str | None:
        if time.monotonic() - self.checked_at < self.recheck_s:
            return self.problem
        try:
            problem = await run_in_threadpool(schema_problem, self.engine)
        except sa.exc.SQLAlchemyError:
            return None  # unreachable: the routes (and /ready) report that themselves
        self.checked_at = time.monotonic()
        self.problem = problem
        self.current = problem is None
        return problem
