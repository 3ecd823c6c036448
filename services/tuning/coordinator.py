"""`focalloop tune`'s flow: begin a study, run its trials here or watch workers run them, then
write what it found. The API begins studies the same way and has no coordinator: any read of a
study's status closes it once its trials are in."""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa

from services.config import Settings
from services.errors import TransientError
from services.tuning.report import write_outputs
from services.tuning.run import Dispatch, TuneOptions
from services.tuning.studies import RUNNING, begin, results, run_here, status


def tune_project(
    engine: sa.Engine,
    settings: Settings,
    project: str,
    options: TuneOptions,
    *,
    out: Path,
    dispatch: Dispatch | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    wait_s: float | None = None,
    poll_s: float = 1.0,
) -> dict[str, Any]:
    """The command's flow: begin a study, run its trials here (`dispatch` None) or on workers
    while watching it, then write its outputs to `out`; returns the summary.

    wait_s: give up watching (TransientError; the study goes on, `status` closes it) when no
    trial ends for that long."""
    study, requests = begin(engine, settings, project, options, dispatch=dispatch)
    if dispatch is None:
        run_here(engine, settings, study, requests, on_progress)
    else:
        _watch(study, on_progress, wait_s, poll_s)
    summary = results(study)
    write_outputs(summary, out)
    return summary


def _watch(
    study: optuna.Study,
    on_progress: Callable[[int, int], None] | None,
    wait_s: float | None,
    poll_s: float,
) -> None:
    """Poll the study until it is closed; TransientError after `wait_s` without a trial ending."""
    last, last_change = -1, time.monotonic()
    while True:
        current = status(study)
        if current.done != last:
            last, last_change = current.done, time.monotonic()
            if on_progress is not None:
                on_progress(current.done, current.total)
        if current.state != RUNNING:
            return
        if wait_s is not None and time.monotonic() - last_change > wait_s:
            raise TransientError(
                f"no tuning trial ended for {wait_s:.0f} s ({current.done} of {current.total} "
                "done): are gpu workers running (focalloop worker --queues gpu)? The study "
                f"{current.name!r} goes on; its status shows when it is done."
            )
        time.sleep(poll_s)
