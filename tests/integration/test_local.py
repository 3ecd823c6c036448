"""`focalloop up`'s in-process loop finishes what a failed pass left half done."""

from pathlib import Path

from services import db
from services.config import Settings
from services.cycle.flow import Stage, Step
from services.cycle.ingest import pending_events
from services.cycle.runner import InProcessLoop
from services.cycle.trigger import maybe_start_cycle
from services.models import ItemStatus
from services.projects import get_project, pool_counts
from tests.conftest import Digits
from tests.integration.cycle_helpers import cycle_row, make_digits_project, stage


def test_answers_left_uningested_by_a_failed_pass_are_ingested_by_the_next(
    settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    # A database of this test's own (as `up` has): recovery acts on every project in it.
    engine = db.make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    db.upgrade(engine)
    project = make_digits_project(engine, settings, digits, tmp_path)
    cycle = maybe_start_cycle(engine, project.name, settings)
    assert cycle is not None and cycle.id is not None
    assert stage(engine, settings, Stage.TRAIN, cycle.id) == [Step(Stage.SELECT, cycle.id)]
    assert stage(engine, settings, Stage.SELECT, cycle.id)
    # The pass stops here, as when ingest raised: the answers are stored, not applied.
    (ingest,) = stage(engine, settings, Stage.HAND_OFF, cycle.id)
    assert len(ingest.event_ids) == 20
    with db.session_scope(engine) as session:
        assert len(pending_events(session)) == 20
    InProcessLoop(engine, settings).recover()
    with db.session_scope(engine) as session:
        assert pending_events(session) == []
        counts = pool_counts(session, get_project(session, project.name)).by_status
    assert counts[ItemStatus.LABELED] == 20
    assert cycle_row(engine, cycle.id).state == "done"
    engine.dispose()
