"""`focalloop worker|beat|cycle ...` and the project controls that steer cycles."""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from services.commands.audited import audit_cli, cli_actor
from services.commands.state import engine_for, project_app
from services.errors import InvalidInput

if TYPE_CHECKING:
    from services.config import Settings

cycle_app = typer.Typer(help="Active-learning cycles of a project.", no_args_is_help=True)
console = Console()


def worker(
    queues: Annotated[str, typer.Option(help="Comma separated: gpu, io.")] = "gpu,io",
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Pool processes. Default: one per visible GPU when serving gpu on a GPU host "
            "(each pinned to its own GPU), else FOCALLOOP_GPU_QUEUE_CONCURRENCY or the CPUs.",
        ),
    ] = None,
    pool: Annotated[str, typer.Option(help="prefork, solo or threads.")] = "prefork",
    loglevel: Annotated[str, typer.Option()] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
) -> None:
    """Run a Celery worker for the given queues (blocks until stopped)."""
    from services import logs
    from services.config import get_settings
    from workers.devices import WorkerPlan, host_cpus, plan_workers, visible_gpus

    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    if not wanted or set(wanted) - {"gpu", "io"}:
        raise InvalidInput(f"--queues takes gpu and/or io, got {queues!r}")
    settings = get_settings()
    refuse_an_old_schema(settings)
    # Planned before the tasks (and torch) are imported: nothing here may initialize CUDA.
    plan = plan_workers(
        queues=wanted,
        concurrency=concurrency,
        settings=settings,
        gpus=visible_gpus(),
        cpus=host_cpus(),
    )
    if pool != "prefork" and plan.gpus:
        # One process is pinned to one GPU: a threads or solo pool uses that one only.
        console.print(f"--pool {pool} runs in one process: it uses GPU {plan.gpus[0]} only")
        plan = WorkerPlan(concurrency=concurrency or 1, gpus=plan.gpus[:1])
    import workers.tasks
    from workers.app import app as celery_app

    workers.tasks.use_plan(plan, forks=pool == "prefork")
    logs.configure(settings.log_level, fmt=settings.log_format)
    argv = [
        "worker",
        f"--queues={','.join(wanted)}",
        f"--pool={pool}",
        f"--concurrency={plan.concurrency}",
        f"--loglevel={loglevel}",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    celery_app.worker_main(argv)


def refuse_an_old_schema(settings: "Settings") -> None:
    """InvalidInput naming `focalloop db upgrade` when the database's schema is not this code's
    (every task would fail on a missing table). An unreachable database is not refused: the
    tasks retry until it answers."""
    import sqlalchemy as sa

    from services.db import engine_from_settings, schema_problem

    engine = engine_from_settings(settings)
    try:
        problem = schema_problem(engine)
    except sa.exc.SQLAlchemyError:
        return
    finally:
        engine.dispose()
    if problem is not None:
        raise InvalidInput(problem)


def beat(
    loglevel: Annotated[str, typer.Option()] = "INFO",
    schedule: Annotated[
        Path | None, typer.Option(help="Beat's state file (default: under the data dir).")
    ] = None,
) -> None:
    """Run Celery beat: maybe_start_cycles, recover_stalled and reconcile_labelers on their
    intervals."""
    from services import logs
    from services.config import get_settings
    from workers.app import app as celery_app

    settings = get_settings()
    refuse_an_old_schema(settings)
    logs.configure(settings.log_level, fmt=settings.log_format)
    path = schedule or settings.data_dir.expanduser() / "celerybeat-schedule"
    path.parent.mkdir(parents=True, exist_ok=True)
    celery_app.start(["beat", f"--schedule={path}", f"--loglevel={loglevel}"])


@cycle_app.command("start")
def cycle_start(name: str) -> None:
    """Start a cycle now (on the newest dataset version) and enqueue its training on the
    broker FOCALLOOP_BROKER_URL names (checked first: when it is unreachable nothing starts)."""
    from services.config import get_settings
    from workers.app import create_app
    from workers.enqueue import broker_location, start_and_enqueue

    settings = get_settings()
    celery = create_app(settings)
    cycle = start_and_enqueue(
        engine_for(settings),
        settings,
        celery,
        name,
        trigger=cli_actor(),
        also=lambda session, cycle: audit_cli(
            session, "cycle.start", name, target=f"cycle:{cycle.id}"
        ),
    )
    console.print(
        f"started cycle {cycle.id} of {name} (dataset v{cycle.dataset_version}); training "
        f"queued on {broker_location(celery)}"
    )


@cycle_app.command("status")
def cycle_status(
    name: str,
    last: Annotated[int, typer.Option(min=1, help="How many recent cycles.")] = 5,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Then follow the project live, one line (stage, progress, current model's "
            "macro-F1, open tasks), until Ctrl-C.",
        ),
    ] = False,
) -> None:
    """The project's recent cycles: state, versions, chunk progress, failure reason."""
    from sqlmodel import col, select

    from services.db import session_scope
    from services.models import Cycle
    from services.projects import get_project
    from services.promotion import gate_alert
    from services.status import cycle_view

    with session_scope(engine_for()) as session:
        project = get_project(session, name)
        rows = session.exec(
            select(Cycle)
            .where(Cycle.project_id == project.id)
            .order_by(col(Cycle.id).desc())
            .limit(last)
        ).all()
        summaries = [cycle_view(session, row).to_dict() for row in rows]
        alert = gate_alert(session, project)
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
            _reason(summary),
        )
    console.print(table)
    if alert is not None:
        console.print(f"[bold yellow]gate alert[/] {alert}")
    if watch:
        _watch(name)


def _watch(name: str) -> None:
    """Follow one project's status line until Ctrl-C."""
    import threading

    from services.commands.live_status import LiveStatus, status_lines

    engine = engine_for()
    status = LiveStatus(console, lambda: status_lines(engine, name))
    status.start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        status.stop()


def _reason(summary: dict[str, Any]) -> str:
    """Why a cycle failed; while it runs, the error it is recovering from; else its note."""
    from services.models import FINAL_CYCLE_STATES

    if summary["failure_reason"]:
        return str(summary["failure_reason"])
    if summary["last_error"] and summary["state"] not in FINAL_CYCLE_STATES:
        return f"retrying after {summary['last_error']} (at {summary['last_error_at']})"
    return str(summary["note"] or "")


@cycle_app.command("cancel")
def cycle_cancel(name: str) -> None:
    """Cancel the project's active cycle (running tasks stop at their next checkpoint)."""
    from services.cycle.start import cancel_cycle
    from services.db import session_scope

    with session_scope(engine_for()) as session:
        cycle = cancel_cycle(session, name)
        audit_cli(session, "cycle.cancel", name, target=f"cycle:{cycle.id}")
        console.print(f"cycle {cycle.id} of {name}: {cycle.state} (cancel requested)")


@project_app.command("pause")
def project_pause(name: str) -> None:
    """Beat starts no cycles for a paused project (a running cycle finishes)."""
    from services.db import session_scope
    from services.projects import set_paused

    with session_scope(engine_for()) as session:
        set_paused(session, name, paused=True)
        audit_cli(session, "project.pause", name)
    console.print(f"project {name} paused")


@project_app.command("resume")
def project_resume(name: str) -> None:
    """Let beat start cycles for the project again."""
    from services.db import session_scope
    from services.projects import set_paused

    with session_scope(engine_for()) as session:
        set_paused(session, name, paused=False)
        audit_cli(session, "project.resume", name)
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
    noise: Annotated[
        float, typer.Option(min=0.0, max=0.99, help="The simulated annotator's error rate.")
    ] = 0.0,
) -> None:
    """Let a simulated annotator answer the project's hand-offs (Label Studio: `focalloop
    labelstudio connect`)."""
    from labeling.simulated import set_simulated_labeler
    from services.config import get_settings
    from services.datasets.tables import read_table_file
    from services.db import session_scope

    if simulated_truth is None:
        raise InvalidInput(
            "give --simulated-truth FILE (or connect Label Studio: focalloop labelstudio connect)"
        )
    settings = get_settings()
    with session_scope(engine_for(settings)) as session:
        set_simulated_labeler(
            session,
            name,
            read_table_file(simulated_truth),
            settings,
            annotator=annotator,
            noise=noise,
        )
        audit_cli(
            session,
            "project.labeler",
            name,
            detail={"kind": "simulated", "truth": str(simulated_truth), "noise": noise},
        )
    console.print(f"project {name}: hand-offs answered by a simulated annotator ({annotator})")
