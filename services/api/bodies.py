"""Reading untrusted request bodies: capped in size while they stream in, parsed as strict JSON
(no NaN or Infinity, which no other JSON reader accepts and no column can hold), and bounded in
depth, so a hostile body is a 4xx answer rather than a 500 or a stored event nothing can apply."""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException, Request

# Label Studio's deepest webhook body is about six levels; 64 leaves room for any real payload
# while staying far below the recursion any JSON writer or database meets.
MAX_JSON_DEPTH = 64


async def read_capped(request: Request, limit: int) -> bytes:
    """The body's bytes; 413 as soon as it (declared or streamed) exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise HTTPException(413, f"body larger than {limit} bytes")
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
