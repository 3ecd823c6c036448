"""A live one-line status per project in the terminal (`up`, `cycle status --watch`): stage and
progress, the current model's macro-F1, open tasks, read from the state database every second.

On a terminal the lines are redrawn in place (rich's Live); when the output is a file or a
pipe, a project's line is printed again only when it changed, so logs stay readable.
"""

import logging
import threading
from collections.abc import Callable

import sqlalchemy as sa
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text
from sqlmodel import select

from services.db import session_scope
from services.models import Project
from services.overview import glance, status_line

log = logging.getLogger(__name__)


def status_lines(engine: sa.Engine, project: str | None = None) -> list[str]:
    """Every project's line (or only `project`'s), by name."""
    with session_scope(engine) as session:
        statement = select(Project).order_by(Project.name)
        if project is not None:
            statement = statement.where(Project.name == project)
        return [status_line(glance(session, row)) for row in session.exec(statement)]


class LiveStatus(threading.Thread):
    """Keeps the status lines current until stop(); `lines` reads them (tests pass their own)."""

    def __init__(
        self,
        console: Console,
        lines: Callable[[], list[str]],
        *,
        interval_s: float = 1.0,
    ) -> None:
        super().__init__(name="focalloop-live-status", daemon=True)
        self.console = console
        self.lines = lines
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.printed: dict[int, str] = {}

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)

    def _read(self) -> list[str] | None:
        try:
            return self.lines()
        except Exception:  # the database briefly away: keep the last lines
            log.warning("could not read the loop's status", exc_info=True)
            return None

    def run(self) -> None:
        if not self.console.is_terminal:
            while True:
                for index, line in enumerate(self._read() or []):
                    if self.printed.get(index) != line:
                        self.printed[index] = line
                        self.console.print(line, highlight=False, soft_wrap=True)
                if self.stopping.wait(self.interval_s):
                    return
        with Live(console=self.console, auto_refresh=False, transient=False) as live:
            while True:
                lines = self._read()
                if lines is not None:
                    live.update(Group(*(Text(line) for line in lines)), refresh=True)
                if self.stopping.wait(self.interval_s):
                    return
