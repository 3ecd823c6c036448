"""The hand-off stage: give the cycle's batch to the project's labeler and finish the cycle.
The labeler may answer at once (the simulated one stores its answers as inbox events, exactly
as a tool's webhooks would be), and then ingest follows; a labeler that refuses for good fails
the cycle with its reason and the batch goes back to the pool."""

import sqlalchemy as sa

from labeling.base import HandOffRefused
from labeling.registry import labeler_for
from services import logs
from services.config import Settings
from services.cycle.flow import Stage, Step
from services.cycle.leases import cancel_if_requested, fail_cycle
from services.db import session_scope
from services.errors import NotFound
from services.models import Cycle, CycleState, Project
from services.state import transition_cycle


def hand_off_stage(engine: sa.Engine, settings: Settings, step: Step) -> list[Step]:
    cycle_id = step.target
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        if cycle is None:
            raise NotFound(f"no cycle with id {cycle_id}")
        if cancel_if_requested(session, cycle) or cycle.state != CycleState.HANDING_OFF:
            return []
        project = session.get(Project, cycle.project_id)
        assert project is not None
        logs.bind(project=project.name, cycle_id=cycle.id)
        labeler = labeler_for(project)
    try:
        event_ids = labeler.hand_off(engine, cycle_id, settings)
    except HandOffRefused as error:
        with session_scope(engine) as session:
            fail_cycle(session, cycle_id, str(error))
        return []
    with session_scope(engine) as session:
        cycle = session.get(Cycle, cycle_id)
        assert cycle is not None
        if cycle.state == CycleState.HANDING_OFF:
            transition_cycle(session, cycle_id, CycleState.DONE)
    return [Step(Stage.INGEST, event_ids=tuple(event_ids))] if event_ids else []
