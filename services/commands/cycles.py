"""`focalloop worker|beat|cycle ...` and the project controls that steer cycles."""

import json
import os
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlmodel import col, select

from services import cycles, logs
from services.commands.state import engine_for, project_app
from services.config import get_settings
from services.datasets.tables import read_table_file
from services.db import session_scope
from services.errors import InvalidInput
from services.models import Cycle
from services.projects import get_project, set_paused

cycle_app = typer.Typer(help="Active-learning cycles of a project.", no_args_is_help=True)
console = Console()


def _gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU, asked without initializing CUDA in this process
    (the worker forks its pool after this; a CUDA context must never cross a fork)."""
    device = get_settings().device
    if device == "cpu":
        return False
    return device == "cuda" or shutil.which("nvidia-smi") is not None


def worker(
    queues: Annotated[str, typer.Option(help="Comma separated: gpu, io.")] = "gpu,io",
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1, help="Pool processes. Default: 1 when serving gpu on a GPU machine, else CPUs."
        ),
    ] = None,
    pool: Annotated[str, typer.Option(help="prefork, solo or threads.")] = "prefork",
    loglevel: Annotated[str, typer.Option()] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
) -> None:
    """Run a Celery worker for the given queues (blocks until stopped)."""
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    if not wanted or set(wanted) - {"gpu", "io"}:
        raise InvalidInput(f"--queues takes gpu and/or io, got {queues!r}")
    if concurrency is None:
        # One process per GPU: a second process on the same GPU would fight for its memory.
        concurrency = 1 if "gpu" in wanted and _gpu_present() else (os.cpu_count() or 1)
    import workers.tasks  # noqa: F401 (registers the tasks)
    from workers.app import app as celery_app

    settings = get_settings()
    logs.configure(settings.log_level, fmt=settings.log_format)

    argv = [
        "worker",
        f"--queues={','.join(wanted)}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    celery_app.worker_main(argv)


def beat(
    loglevel: Annotated[str, typer.Option()] = "INFO",
    schedule: Annotated[
        Path | None, typer.Option(help="Beat's state file (default: under the data dir).")
    ] = None,
) -> None:
    """Run Celery beat: maybe_start_cycles and recover_stalled on their intervals."""
    from workers.app import app as celery_app

    settings = get_settings()
    logs.configure(settings.log_level, fmt=settings.log_format)
    path = schedule or settings.data_dir.expanduser() / "celerybeat-schedule"
    path.parent.mkdir(parents=True, exist_ok=True)
    celery_app.start(["beat", f"--schedule={path}", f"--loglevel={loglevel}"])


@cycle_app.command("start")
def cycle_start(name: str) -> None:
    """Start a cycle now (on the newest dataset version) and enqueue its training."""
    from workers.tasks import train

    settings = get_settings()
    with session_scope(engine_for(settings)) as session:
        cycle = cycles.start_cycle(session, name, trigger="cli", settings=settings)
        cycle_id = cycle.id or 0
    train.delay(cycle_id)
    console.print(f"started cycle {cycle_id} of {name} (dataset v{cycle.dataset_version})")


@cycle_app.command("status")
def cycle_status(
    name: str,
    last: Annotated[int, typer.Option(min=1, help="How many recent cycles.")] = 5,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The project's recent cycles: state, versions, chunk progress, failure reason."""
    with session_scope(engine_for()) as session:
        project = get_project(session, name)
        rows = session.exec(
            select(Cycle)
            .where(Cycle.project_id == project.id)
            .order_by(col(Cycle.id).desc())
            .limit(last)
        ).all()
        summaries = [cycles.cycle_summary(session, row) for row in rows]
    if json_out:
        console.print_json(json.dumps(summaries))
        return
    table = Table("id", "state", "trigger", "data", "model", "chunks", "selected", "reason")
    for summary in summaries:
        table.add_row(
            str(summary["id"]),
            str(summary["state"]),
            str(summary["trigger"]),
            f"v{summary['dataset_version']}" if summary["dataset_version"] else "-",
            f"m{summary['model_version']}" if summary["model_version"] else "-",
            str(summary["chunks"] or "-"),
            str(summary["selected"] if summary["selected"] is not None else "-"),
            str(summary["failure_reason"] or ""),
        )
    console.print(table)


@cycle_app.command("cancel")
def cycle_cancel(name: str) -> None:
    """Cancel the project's active cycle (running tasks stop at their next checkpoint)."""
    with session_scope(engine_for()) as session:
        cycle = cycles.cancel_cycle(session, name)
        console.print(f"cycle {cycle.id} of {name}: {cycle.state} (cancel requested)")


@project_app.command("pause")
def project_pause(name: str) -> None:
    """Beat starts no cycles for a paused project (a running cycle finishes)."""
    with session_scope(engine_for()) as session:
        set_paused(session, name, paused=True)
    console.print(f"project {name} paused")


@project_app.command("resume")
def project_resume(name: str) -> None:
    """Let beat start cycles for the project again."""
    with session_scope(engine_for()) as session:
        set_paused(session, name, paused=False)
    console.print(f"project {name} resumed")


@project_app.command("labeler")
def project_labeler(
    name: str,
    simulated_truth: Annotated[
        Path | None,
        typer.Option(help="Answer hand-offs from this file (item_id, label): a simulation."),
    ] = None,
    annotator: Annotated[str, typer.Option(help="Name recorded on simulated answers.")] = (
        "simulated"
    ),
) -> None:
    """Choose who answers the project's hand-offs (Label Studio arrives with its issue)."""
    if simulated_truth is None:
        raise InvalidInput("give --simulated-truth FILE (the only labeler available so far)")
    settings = get_settings()
    with session_scope(engine_for(settings)) as session:
        cycles.set_simulated_labeler(
            session, name, read_table_file(simulated_truth), settings, annotator=annotator
        )
    console.print(f"project {name}: hand-offs answered by a simulated annotator ({annotator})")
