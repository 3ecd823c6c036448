"""Reading untrusted request bodies: capped in size before they are parsed (per route, in a
middleware), parsed as strict JSON (no NaN or Infinity, which no other JSON reader accepts and
no column can hold), and bounded in depth, so a hostile body is a 4xx answer rather than a 500,
a stalled server or a stored event nothing can apply."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Label Studio's deepest webhook body is about six levels; 64 leaves room for any real payload
# while staying far below the recursion any JSON writer or database meets.
MAX_JSON_DEPTH = 64

log = logging.getLogger(__name__)


async def read_capped(request: Request, limit: int) -> bytes:
    """The body's bytes; 413 as soon as it (declared or streamed) exceeds `limit` bytes; 400
    when the client hangs up before sending all of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body larger than {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise HTTPException(413, f"body larger than {limit} bytes")
    except ClientDisconnect:
        # Label Studio gives up on a webhook after its WEBHOOK_TIMEOUT: the event is not
        # stored, and the next reconciliation finds it. A warning, not a 500's traceback.
        log.warning("%s: the client hung up before its body arrived", request.url.path)
        raise HTTPException(400, "the client hung up before its body arrived") from None
    return bytes(body)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_depth(value: object) -> int:
    """How deeply lists and objects nest in `value` (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: list[object] = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def json_object(raw: bytes) -> dict[str, Any]:
    """`raw` as a JSON object; 400 with a short reason (never the body) when it is not UTF-8
    JSON, holds NaN/Infinity, an integer past Python's digit limit, nests deeper than
    MAX_JSON_DEPTH, or is not an object."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise HTTPException(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, the int digit limit
        raise HTTPException(400, f"the body is not JSON: {str(error)[:200]}") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise HTTPException(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def validation_problems(errors: Sequence[Any], *, most: int = 20) -> list[dict[str, Any]]:
    """FastAPI's validation errors without the input they were given (which can be megabytes,
    or a secret): where (loc), what (msg) and its kind (type), for the first `most` errors."""
    return [
        {
            "loc": [part if isinstance(part, int) else str(part)[:60] for part in error["loc"][:8]],
            "msg": str(error.get("msg", ""))[:300],
            "type": str(error.get("type", "")),
        }
        for error in list(errors)[:most]
    ]


class BodyLimit:
    """ASGI middleware: a request body larger than its route's limit is answered 413 before any
    handler, or FastAPI's JSON parser, spends time on it (parsing and validating happen on the
    event loop, so one huge body would stall every other request, webhooks included).

    limit_for(method, path) -> bytes, or None for a route that caps its own body (the webhook,
    which also counts what it refuses). A declared Content-Length is checked before anything is
    read; a streamed body is read up to the limit first and handed on whole."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int | None]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = None
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            limit = self.limit_for(scope["method"], scope["path"])
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(limit)(scope, receive, send)
            return
        # Read it all here: FastAPI turns any error raised while it reads into a 400.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nobody to answer
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                await _too_large(limit)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        handed = False

        async def replay() -> Message:
            nonlocal handed
            if handed:
                return await receive()  # after the body: wait for the disconnect as usual
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"body larger than {limit} bytes"}, status_code=413)
