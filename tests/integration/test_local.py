"""`focalloop up`'s in-process loop finishes what a failed pass left half done."""

from pathlib import Path

from services import cycles, db
from services.config import Settings
from services.local import InProcessLoop
from services.models import ItemStatus
from services.projects import get_project, pool_counts
from tests.conftest import Digits
from tests.integration.cycle_helpers import cycle_row, make_digits_project


def test_answers_left_uningested_by_a_failed_pass_are_ingested_by_the_next(
    settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    # A database of this test's own (as `up` has): recovery acts on every project in it.
    engine = db.make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    db.upgrade(engine)
    project = make_digits_project(engine, settings, digits, tmp_path)
    cycle = cycles.maybe_start_cycle(engine, project.name, settings)
    assert cycle is not None and cycle.id is not None
    assert cycles.train_cycle(engine, cycle.id, settings).select  # cold start
    assert cycles.select_cycle(engine, cycle.id, settings)
    # The pass stops here, as when ingest raised: the answers are stored, not applied.
    assert len(cycles.hand_off(engine, cycle.id, settings)) == 20
    with db.session_scope(engine) as session:
        assert len(cycles.pending_events(session)) == 20
    InProcessLoop(engine, settings).recover()
    with db.session_scope(engine) as session:
        assert cycles.pending_events(session) == []
        counts = pool_counts(session, get_project(session, project.name)).by_status
    assert counts[ItemStatus.LABELED] == 20
    assert cycle_row(engine, cycle.id).state == "done"
    engine.dispose()
