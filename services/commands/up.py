"""`focalloop up`: the whole loop on one machine, without Docker.

Embedded defaults (a SQLite file and a local dataset store under the data dir), the API, one
worker for both queues and beat, on a private `redis-server` (or REDIS_URL). Without Redis the
loop runs in this process beside the API. `--with-label-studio` installs and starts a local
Label Studio and connects the digits demo project to it. Everything `up` runs is imported
when it runs, so the other commands do not pay for it.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Protocol

import typer
from rich.console import Console

if TYPE_CHECKING:
    import sqlalchemy as sa

    from services.config import Settings

console = Console(soft_wrap=True)
LABEL_STUDIO_TOKEN_ENV = "LABEL_STUDIO_TOKEN"
FOCALLOOP = [sys.executable, "-m", "services.cli"]


def _wait_until_healthy(
    url: str, processes: list[subprocess.Popen[bytes]], timeout_s: float
) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{_name(process)} exited early (see the logs folder)")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


def _name(process: subprocess.Popen[bytes]) -> str:
    args = process.args
    return " ".join(str(a) for a in args) if isinstance(args, list) else str(args)


# After Ctrl-C the children get this long to exit on their own, all at once, before their
# process groups are killed. The worker stops cold (acks_late puts its running task back), so no
# one waits for a training to finish; all of them exit within a few seconds.
STOP_GRACE_S = 10.0
# The private redis-server stops after the others, once the worker has put its task back; on
# SIGTERM it flushes its append-only file and exits in well under a second.
BROKER_GRACE_S = 5.0


class _Server(Protocol):
    """RedisServer and LocalLabelStudio: their process exists only once they are started."""

    process: subprocess.Popen[bytes] | None


@dataclass(frozen=True)
class _Child:
    owner: subprocess.Popen[bytes] | _Server
    stop_signal: signal.Signals
    # Send stop_signal to the whole process group, or to the leader only (the worker, whose
    # cold shutdown ends its own pool).
    group: bool

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.owner if isinstance(self.owner, subprocess.Popen) else self.owner.process


class _Children:
    """Everything `up` starts, each in a process group of its own (a worker's pool processes,
    a server's helpers), stopped together: stopping one after another, each allowed 20 s and a
    worker waiting for its training, left `up` running 90 s after Ctrl-C on a loaded machine.
    Each child also gets a parent-death signal (`die_with_parent`), so a killed `up` leaves
    nothing behind either."""

    def __init__(self) -> None:
        self._first: list[_Child] = []
        self._last: list[_Child] = []

    def add(
        self,
        owner: subprocess.Popen[bytes] | _Server,
        stop_signal: signal.Signals = signal.SIGTERM,
        *,
        group: bool = True,
        last: bool = False,
    ) -> None:
        """Stop `owner` with `stop_signal`; `last` ones (the broker) after all the others."""
        (self._last if last else self._first).append(_Child(owner, stop_signal, group))

    def stop(self) -> None:
        """Signal every child at once, wait for them together until a deadline, then kill
        their process groups: stragglers, and what a child left behind. Another Ctrl-C or
        SIGTERM meanwhile kills them at once (rather than abandoning the stop halfway)."""
        hurry: list[int] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: hurry.append(signum))
        _stop_together(self._first, STOP_GRACE_S, hurry)
        # Not hurried: the broker takes under a second to flush what it holds.
        _stop_together(self._last, BROKER_GRACE_S, [])


def _stop_together(children: list[_Child], grace_s: float, hurry: list[int]) -> None:
    started = [(c, p) for c in children if (p := c.process) is not None]
    for child, process in started:
        if process.poll() is None:
            if child.group:
                _signal_group(process, child.stop_signal)
            else:
                process.send_signal(child.stop_signal)
    deadline = time.monotonic() + grace_s
    while (
        time.monotonic() < deadline
        and not hurry
        and any(process.poll() is None for _, process in started)
    ):
        time.sleep(0.1)
    for _, process in started:
        # Even when the leader is gone: its group may still hold processes it started.
        _signal_group(process, signal.SIGKILL)
    for _, process in started:
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The group keeps the leader's id while any member lives, so the id cannot be reused.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _stop_on_signals() -> None:
    """Treat SIGTERM like Ctrl-C, so `kill` stops the children as cleanly as a keypress; and
    answer Ctrl-C even when started by a parent that ignores SIGINT (a shell's background job
    without job control passes SIG_IGN on, and Python then installs no handler of its own)."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def up(
    port: Annotated[int, typer.Option(min=1, max=65535, help="The API's port.")] = 8000,
    with_label_studio: Annotated[
        bool,
        typer.Option(help="Install (once) and start a local Label Studio and connect the demo."),
    ] = False,
    label_studio_port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
    demo: Annotated[
        bool, typer.Option(help="Create the digits demo project on the first run.")
    ] = True,
) -> None:
    """Run the whole loop on this machine until Ctrl-C (SQLite, local store, API, worker, beat)."""
    from pydantic import SecretStr
    from sqlmodel import select

    from labeling.label_studio.link import (
        DEFAULT_REVIEW_THRESHOLD,
        DEFAULT_REVIEWS_PER_CYCLE,
        KEPT_WEBHOOK_SECRET,
    )
    from labeling.label_studio.link import KIND as LABEL_STUDIO
    from labeling.label_studio.link import connect as connect_label_studio
    from services.config import (
        child_environment,
        get_settings,
        provide_secret,
        redis_url_from_environment,
    )
    from services.db import engine_from_settings, session_scope
    from services.db import upgrade as upgrade_database
    from services.local import (
        DEMO_PROJECT,
        ensure_admin_token,
        ensure_demo_project,
        ensure_webhook_secret,
    )
    from services.models import Project
    from services.servers import RedisServer, die_with_parent

    base = get_settings()
    data_dir = base.data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    sources = data_dir / "sources"
    secret = (
        base.webhook_secret.get_secret_value()
        if base.webhook_secret
        else ensure_webhook_secret(data_dir / KEPT_WEBHOOK_SECRET)
    )
    settings = base.model_copy(
        update={
            "data_dir": data_dir,
            "webhook_secret": SecretStr(secret),
            "api_url": f"http://127.0.0.1:{port}",
            "source_roots": [*base.source_roots, f"file://{sources}"],
        }
    )
    engine = engine_from_settings(settings)
    upgrade_database(engine)
    token_file = data_dir / "admin-token"
    created_token = ensure_admin_token(engine, token_file)
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    _stop_on_signals()
    with ExitStack() as cleanup:
        children = _Children()
        cleanup.callback(children.stop)
        label_studio_url = None
        if with_label_studio:
            from labeling.label_studio.server import (
                LEGACY_CREDENTIALS,
                UP_LABEL_STUDIO_DIR,
                LocalLabelStudio,
                default_cache_dir,
                ensure_installed,
            )

            console.print(
                "Label Studio: installing once into ~/.cache/focalloop (a few minutes)..."
            )
            server = LocalLabelStudio(
                ensure_installed(default_cache_dir()),
                port=label_studio_port,
                data_dir=data_dir / UP_LABEL_STUDIO_DIR,
                owned=True,
            )
            console.print(f"Label Studio: starting on {server.url} (about a minute the first time)")
            if server.credentials == LEGACY_CREDENTIALS:
                console.print(
                    "[yellow]Label Studio: this data directory was made with focalloop's old, "
                    "published password and API token: change both in Label Studio (Account & "
                    "Settings), or start from a new data directory[/]"
                )
            children.add(server)  # before it starts: Ctrl-C may come while it does
            server.start()
            provide_secret(LABEL_STUDIO_TOKEN_ENV, server.credentials.token)
            label_studio_url = server.url
        if demo:
            ensure_demo_project(engine, settings, sources, simulated=not with_label_studio)
            if label_studio_url is not None:
                with session_scope(engine) as session:
                    connected = session.exec(
                        select(Project.labeler).where(Project.name == DEMO_PROJECT)
                    ).one()
                # Connect on every start (it is safe to repeat): a data directory from an older
                # focalloop gets the current labeling interface and hardest-first stream. The
                # review settings a person chose stay as they were.
                kept = connected if connected.get("kind") == LABEL_STUDIO else {}
                with session_scope(engine) as session:
                    connect_label_studio(
                        session,
                        DEMO_PROJECT,
                        url=label_studio_url,
                        token_env=LABEL_STUDIO_TOKEN_ENV,
                        settings=settings,
                        review_threshold=float(
                            kept.get("review_threshold", DEFAULT_REVIEW_THRESHOLD)
                        ),
                        reviews_per_cycle=int(
                            kept.get("reviews_per_cycle", DEFAULT_REVIEWS_PER_CYCLE)
                        ),
                    )

        broker = redis_url_from_environment()
        broker_note = f"REDIS_URL ({broker})" if broker else ""
        if broker is None and shutil.which("redis-server"):
            redis_server = RedisServer(data_dir / "redis", append_only=True, owned=True)
            children.add(redis_server, last=True)
            redis_server.start()
            broker = redis_server.url
            broker_note = (
                f"a private redis-server on 127.0.0.1:{redis_server.port} "
                f"(append-only, in {data_dir / 'redis'})"
            )
        api_url = f"http://127.0.0.1:{port}"
        if broker is not None:
            environment = child_environment(settings.model_copy(update={"broker_url": broker}))
            processes = []
            for name, args in (
                ("api", ["api", "--port", str(port)]),
                (
                    "worker",
                    ["worker", "--queues", "gpu,io", "--concurrency", "2", "--hostname", "up@%h"],
                ),
                ("beat", ["beat", "--schedule", str(data_dir / "celerybeat-schedule")]),
            ):
                child = subprocess.Popen(
                    [*FOCALLOOP, *args],
                    env=environment,
                    stdout=(logs / f"{name}.log").open("ab"),
                    stderr=subprocess.STDOUT,
                    # Its own group: the terminal's Ctrl-C reaches `up` alone, which stops the
                    # children together. SIGKILLed when `up` dies: what they do is in the
                    # database and the broker (and a worker's pool processes die with it).
                    start_new_session=True,
                    preexec_fn=die_with_parent(signal.SIGKILL),
                )
                if name == "worker":
                    # A cold shutdown: a warm one waits for a training to finish, and acks_late
                    # puts the interrupted task back on the queue.
                    children.add(child, signal.SIGQUIT, group=False)
                else:
                    children.add(child)
                processes.append(child)
            _wait_until_healthy(f"{api_url}/api/v1/health", processes, timeout_s=60)
            _summary(settings, api_url, token_file, created_token, broker_note, label_studio_url)
            from services.commands.gate_watch import GateWatch
            from services.commands.live_status import LiveStatus, status_lines

            watch = GateWatch(engine, console)
            watch.start()
            status = LiveStatus(console, lambda: status_lines(engine))
            status.start()
            try:
                while all(process.poll() is None for process in processes):
                    time.sleep(0.5)
                status.stop()  # before the message, so the live line is not drawn over it
                failed = [p for p in processes if p.poll() is not None]
                console.print(f"[bold red]{_name(failed[0])} exited; see {logs}[/]")
                raise typer.Exit(1)
            except KeyboardInterrupt:
                console.print("stopping...")
            finally:
                status.stop()
                watch.stop()
        else:
            in_process = settings.model_copy(update={"broker_url": "memory://"})
            _summary(
                settings,
                api_url,
                token_file,
                created_token,
                "none: no redis-server on the PATH and no REDIS_URL, so the loop runs in this "
                "process (one cycle at a time, beside the API)",
                label_studio_url,
            )
            _serve_in_process(in_process, engine, port)
    engine.dispose()
    # All stopped; what is left is the interpreter's exit, whose last garbage collections over
    # the objects of torch and scikit-learn (imported for the demo) took about 3 s of a 7-8 s
    # Ctrl-C. Nothing needs collecting any more: exclude them all.
    gc.freeze()


def _serve_in_process(settings: Settings, engine: sa.Engine, port: int) -> None:
    import uvicorn

    from services import logs
    from services.api.app import create_app, freeze_startup_objects
    from services.commands.gate_watch import GateWatch
    from services.commands.live_status import LiveStatus, status_lines
    from services.cycle.runner import InProcessLoop

    # The terminal keeps the summary; the API's and the loop's lines go to the logs folder.
    logs.configure(
        settings.log_level,
        fmt=settings.log_format,
        path=settings.data_dir / "logs" / "up.log",
    )
    app = create_app(settings, engine=engine)
    freeze_startup_objects()  # before the loop's thread allocates what it trains
    loop = InProcessLoop(engine, settings)
    loop.start()
    watch = GateWatch(engine, console)
    watch.start()
    status = LiveStatus(console, lambda: status_lines(engine))
    status.start()
    try:
        uvicorn.run(
            app,
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
        )
    finally:
        status.stop()
        watch.stop()
        loop.stop()
        loop.join(timeout=60)


def _summary(
    settings: Settings,
    api_url: str,
    token_file: Path,
    created_token: bool,
    broker_note: str,
    label_studio_url: str | None,
) -> None:
    from services.local import DEMO_PROJECT

    console.print(f"[bold]focalloop is up[/] (state and data in {settings.data_dir})")
    console.print(f"  console    {api_url}/ (sign in with the admin token below)")
    console.print(f"  API        {api_url}/docs")
    console.print(
        f"  token      {'created: ' if created_token else ''}an admin token is in {token_file}"
    )
    console.print(f"  broker     {broker_note}")
    if label_studio_url is not None:
        from labeling.label_studio.server import CREDENTIALS_FILE, UP_LABEL_STUDIO_DIR

        credentials = (
            settings.data_dir.expanduser().resolve() / UP_LABEL_STUDIO_DIR / CREDENTIALS_FILE
        )
        console.print(
            f"  labeling   Label Studio at {label_studio_url}, project digits: press "
            f"'Label All Tasks' (hardest first); its admin user, password and API token are "
            f"in {credentials} (readable by you only)"
        )
    else:
        console.print("  labeling   a simulated annotator answers the digits project's tasks")
    console.print(
        f'  watch      curl -H "Authorization: Bearer $(cat {token_file})" '
        f"{api_url}/api/v1/projects/{DEMO_PROJECT}/models"
    )
    console.print(f"  logs       {settings.data_dir / 'logs'} (JSON lines)")
    console.print("Ctrl-C stops everything.")
