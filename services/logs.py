"""Structured logs: one JSON object per line, carrying the project, cycle and task in hand.

The ids come from a context variable, so they follow the work rather than the call stack:
Celery tasks set the task's id and name before they run (workers/tasks.py), the cycle code binds
the project and cycle once it has loaded them, and every log line written meanwhile, by any
module, carries them.
"""

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "focalloop_log_context", default=None
)
# LogRecord attributes that are not extra fields a caller passed.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def bind(**fields: Any) -> None:
    """Add fields (project, cycle_id, task_id, ...) to every log line of the current context."""
    _CONTEXT.set({**context(), **{k: v for k, v in fields.items() if v is not None}})


def clear() -> None:
    _CONTEXT.set({})


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """`bind` for the duration of a block, restoring the previous fields after it."""
    token = _CONTEXT.set({**context(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def context() -> dict[str, Any]:
    """The fields bound in the current context."""
    return dict(_CONTEXT.get() or {})


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "message", <bound fields>, <extra fields>, "exception"?}."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(context())
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class RedactQuery(logging.Filter):
    """Blanks every query value of uvicorn's access lines: a token passed as `?token=` or a
    media link's signature would otherwise be written to the logs in clear."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path, _, query = args[2].partition("?")
            if query:
                keys = [pair.partition("=")[0] for pair in query.split("&")]
                redacted = "&".join(f"{key}=..." for key in keys)
                record.args = (*args[:2], f"{path}?{redacted}", *args[3:])
        return True


def configure(
    level: str,
    *,
    fmt: Literal["json", "text"] = "json",
    path: Path | None = None,
    access_log: bool = False,
) -> None:
    """Route every logger (ours, Celery's, uvicorn's) to stderr (or the file `path`, appended)
    in `fmt` at `level`. uvicorn's access lines only when `access_log`, query values redacted
    (uvicorn writes them whenever its access logger reaches a handler, whatever its own
    access_log flag said)."""
    handler: logging.Handler = (
        logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler(sys.stderr)
    )
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.filters[:] = [RedactQuery()]
    # uvicorn decides per connection from hasHandlers(): no propagation, no lines at all.
    access.propagate = access_log
