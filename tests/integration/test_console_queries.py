"""The console's queries on PostgreSQL never scan the item table: a project's pool can hold a
million items, and every page and data endpoint must stay fast (`focalloop bench console`
measures them). Each statement the pages run is captured and EXPLAINed with sequential scans
discouraged, so a plan that still scans `item` has no index to use. A walk along a whole index
of `item` (an index scan with no condition: what a merge join in id order does) counts as a
scan too."""

import re
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


SCAN_OF_ITEM = re.compile(
    r"(Seq Scan|Index Scan|Index Only Scan)( Backward)?( using \S+)? on item\b"
)


def item_scans(plan: list[str]) -> list[str]:
    """The plan's nodes that read `item` without a condition on an index: sequential scans, and
    index scans with no "Index Cond" among their details."""
    found = []
    for index, line in enumerate(plan):
        if not SCAN_OF_ITEM.search(line):
            continue
        depth = len(line) - len(line.lstrip(" ->"))
        details = []
        for following in plan[index + 1 :]:
            if (
                following.lstrip().startswith("->")
                or len(following) - len(following.lstrip()) <= depth
            ):
                break
            details.append(following.strip())
        if "Seq Scan" in line or not any(d.startswith("Index Cond") for d in details):
            found.append(line.strip())
    return found


def test_a_walk_along_a_whole_index_counts_as_a_scan() -> None:
    merge_join = [
        "Merge Join  (cost=179.76..762.40 rows=1 width=25)",
        "  Merge Cond: (item.id = labeltask.item_id)",
        "  ->  Index Scan using item_pkey on item  (cost=0.42..54822.43 rows=567 width=17)",
        "        Filter: ((status)::text = ANY ('{queued,in_review}'::text[]))",
        "  ->  Sort  (cost=179.32..180.57 rows=500 width=16)",
    ]
    by_index = [
        "Index Only Scan using ix_item_eval_set on item  (cost=0.14..188.27 rows=100 width=9)",
        "  Index Cond: (project_id = 1)",
    ]
    assert item_scans(merge_join) == [merge_join[2].strip()]
    assert item_scans(by_index) == []
    assert item_scans(["Seq Scan on item  (cost=0.00..5.50 rows=200 width=22)"]) != []
    assert item_scans(["Seq Scan on itemstatus  (cost=0.00..5.50 rows=200 width=22)"]) == []


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
