"""The `up` terminal's watch on the promotion gate: a project whose newest models the gate keeps
rejecting is named there, once each time the run of rejections grows, so the person who started
the loop hears of it without opening the metrics."""

import logging
import threading

import sqlalchemy as sa
from rich.console import Console
from sqlmodel import select

from services.db import session_scope
from services.models import Project
from services.promotion import gate_alert

log = logging.getLogger(__name__)


class GateWatch(threading.Thread):
    def __init__(self, engine: sa.Engine, console: Console, *, interval_s: float = 10.0) -> None:
        super().__init__(name="focalloop-gate-watch", daemon=True)
        self.engine = engine
        self.console = console
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.said: dict[str, str] = {}

    def stop(self) -> None:
        self.stopping.set()

    def check(self) -> list[str]:
        """The alerts not printed yet (each project's newest one), printed now."""
        with session_scope(self.engine) as session:
            alerts = {
                project.name: gate_alert(session, project)
                for project in session.exec(select(Project)).all()
            }
        fresh = []
        for name, alert in alerts.items():
            if alert is None:
                self.said.pop(name, None)
            elif self.said.get(name) != alert:
                self.said[name] = alert
                fresh.append(alert)
                self.console.print(f"[bold yellow]gate alert[/] {alert}")
        return fresh

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                self.check()
            except Exception:
                log.warning("could not read the gate's decisions", exc_info=True)
