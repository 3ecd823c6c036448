"""The console's queries on PostgreSQL never scan the item table: a project's pool can hold a
million items, and every page and data endpoint must stay fast (`focalloop bench console`
measures them). Each statement the pages run is captured and EXPLAINed with sequential scans
discouraged, so a plan that still scans `item` has no index to use."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from services import db
from services.api.app import create_app
from services.auth import create_token
from services.config import Settings
from tests.conftest import Digits
from tests.integration.cycle_helpers import project_with_models

pytestmark = pytest.mark.timeout(120)
SAME = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}


class Recorder:
    """The statements an engine runs while recording."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.statements: list[tuple[str, Any]] = []
        self.on = False
        sa.event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, _c: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if self.on:
            self.statements.append((statement, parameters))

    def close(self) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._seen)


@pytest.fixture
def recorder(pg_engine: sa.Engine) -> Iterator[Recorder]:
    recording = Recorder(pg_engine)
    yield recording
    recording.close()


def test_no_console_query_scans_the_item_table(
    pg_engine: sa.Engine,
    settings: Settings,
    digits: Digits,
    tmp_path: Path,
    recorder: Recorder,
) -> None:
    project = project_with_models(pg_engine, settings, digits, tmp_path, cycles=4)
    with db.session_scope(pg_engine) as session:
        _, token = create_token(session, name="explain", scope="read", actor="test")
    with TestClient(create_app(settings, engine=pg_engine)) as client:
        assert client.post("/console/sign-in", data={"token": token}, headers=SAME).is_success
        recorder.on = True
        for path in (
            "/console/",
            "/console/data/projects",
            f"/console/projects/{project.name}",
            f"/console/data/projects/{project.name}/live",
            f"/console/data/projects/{project.name}/curve",
        ):
            assert client.get(path).status_code == 200, path
        recorder.on = False
    on_items = [
        (statement, parameters)
        for statement, parameters in recorder.statements
        if statement.lstrip().upper().startswith("SELECT") and " item" in statement
    ]
    assert len(on_items) >= 5  # the pages do read items: pool counts, issues, queue
    scans = []
    with pg_engine.connect() as connection:
        connection.exec_driver_sql("SET enable_seqscan = off")
        for statement, parameters in on_items:
            plan = "\n".join(
                row[0] for row in connection.exec_driver_sql(f"EXPLAIN {statement}", parameters)
            )
            if "Seq Scan on item" in plan:
                scans.append(f"{statement}\n{plan}")
    assert scans == [], "\n\n".join(scans)
