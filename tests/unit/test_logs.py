"""JSON log lines carry the bound project/cycle/task fields and the caller's extras."""

import json
import logging
from collections.abc import Iterator

import pytest

from services import logs


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """`configure` replaces the root handlers (pytest's capture among them): put them back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs.clear()


def test_a_line_carries_bound_fields_extras_and_the_exception(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("INFO", fmt="json")
    log = logging.getLogger("focalloop.test")
    logs.clear()
    logs.bind(task_id="t-1", task="focalloop.train")
    with logs.bound(project="digits", cycle_id=7):
        log.info("cycle %d: %s -> %s", 7, "training", "scoring", extra={"state": "scoring"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    log.warning("after the block")
    logs.clear()
    first, second, third = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert {k: first[k] for k in ("level", "logger", "message", "project", "cycle_id")} == {
        "level": "INFO",
        "logger": "focalloop.test",
        "message": "cycle 7: training -> scoring",
        "project": "digits",
        "cycle_id": 7,
    }
    assert (first["task_id"], first["task"], first["state"]) == (
        "t-1",
        "focalloop.train",
        "scoring",
    )
    assert "ValueError: boom" in second["exception"]
    assert "project" not in third and third["task_id"] == "t-1"


def test_text_format_is_one_plain_line(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("INFO", fmt="text")
    logging.getLogger("focalloop.test").info("hello")
    assert capsys.readouterr().err.rstrip().endswith("INFO focalloop.test: hello")
