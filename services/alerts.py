"""The conditions of infra/prometheus/alerts.yml, evaluated by focalloop itself from its state
database, for deployments without Prometheus (`focalloop up`, the console).

One function per rule, registered under the rule's alert name; a unit test holds the registry
to the rules file, so a rule added there without an evaluator here fails CI. Prometheus's `for:`
durations are not modelled: a condition is reported the moment it holds. The webhook rule sees
only events refused at ingest (stored in the inbox); deliveries refused at the door are counted
in the API process's memory, which only /metrics exports.
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from services.gate import gate_config
from services.models import (
    Annotation,
    Cycle,
    CycleState,
    InboxEvent,
    Item,
    ItemStatus,
    ModelVersion,
    Project,
    utcnow,
)
from services.promotion import current_model, rejections_in_a_row
from services.status import HUMAN_SOURCES, supported_recalls

HARD_RATE_FLOOR = 0.05
HARD_RATE_SPIKE = 1.5
HARD_RATE_WINDOW = timedelta(days=7)
FAILED_CYCLE_WINDOW = timedelta(hours=1)
REFUSED_EVENT_WINDOW = timedelta(hours=1)
LABEL_SILENCE = timedelta(days=1)


@dataclass(frozen=True)
class Firing:
    """An alert whose condition holds now; severity as in alerts.yml."""

    alert: str
    severity: str
    summary: str


Rule = Callable[[Session, Project, datetime], str | None]


def _recall_below_target(session: Session, project: Project, now: datetime) -> str | None:
    targets = gate_config(project).recall_targets
    model = current_model(session, project)
    if not targets or model is None:
        return None
    recalls = supported_recalls(model.metrics, list(project.labels))
    below = [
        f"{label} {recalls[label]:.0%} < {target:.0%}"
        for label, target in sorted(targets.items())
        if label in recalls and recalls[label] < float(target)
    ]
    return f"recall below target: {', '.join(below)} (m{model.version})" if below else None


def _hard_rate(rates: dict[str, Any]) -> float | None:
    """The headline report's hard-example rate: the evaluation set's, else the validation
    split's (each given as the rate itself or as its whole report)."""
    for key in ("evaluation", "validation"):
        value = rates.get(key)
        if isinstance(value, dict):
            value = value.get("hard_example_rate")
        if value is not None:
            return float(value)
    return None


def _hard_example_spike(session: Session, project: Project, now: datetime) -> str | None:
    model = current_model(session, project)
    rate = _hard_rate(model.metrics) if model is not None else None
    if model is None or rate is None or rate <= HARD_RATE_FLOOR:
        return None
    # From the models' curve summaries (services/curve.py), small beside their full metrics;
    # models recorded before summaries existed give their two rates from the metrics.
    recent = (
        col(ModelVersion.project_id) == project.id,
        col(ModelVersion.created_at) >= now - HARD_RATE_WINDOW,
    )
    found: list[float | None] = []
    unsummarized = []
    for model_id, summary in session.execute(
        sa.select(col(ModelVersion.id), col(ModelVersion.summary)).where(*recent)
    ):
        if summary is None:
            unsummarized.append(model_id)
        else:
            found.append(summary.get("hard_example_rate"))
    if unsummarized:
        stored = col(ModelVersion.metrics)
        found.extend(
            _hard_rate({"evaluation": evaluation, "validation": validation})
            for evaluation, validation in session.execute(
                sa.select(
                    stored["evaluation"]["hard_example_rate"],
                    stored["validation"]["hard_example_rate"],
                ).where(col(ModelVersion.id).in_(unsummarized))
            )
        )
    week = [float(value) for value in found if value is not None]
    average = sum(week) / len(week) if week else rate
    if rate <= HARD_RATE_SPIKE * average:
        return None
    return (
        f"hard-example rate {rate:.0%} is over {HARD_RATE_SPIKE}x its weekly average {average:.0%}"
    )


def _gate_rejecting(session: Session, project: Project, now: datetime) -> str | None:
    streak = rejections_in_a_row(session, project)
    if streak < gate_config(project).alert_after_rejections:
        return None
    return f"the gate rejected the newest {streak} models in a row"


def _cycles_failing(session: Session, project: Project, now: datetime) -> str | None:
    failed = session.exec(
        select(func.count())
        .select_from(Cycle)
        .where(
            Cycle.project_id == project.id,
            Cycle.state == CycleState.FAILED,
            col(Cycle.finished_at) >= now - FAILED_CYCLE_WINDOW,
        )
    ).one()
    return f"{failed} cycle(s) failed in the last hour" if failed else None


def _events_refused(session: Session, project: Project, now: datetime) -> str | None:
    refused = session.exec(
        select(func.count())
        .select_from(InboxEvent)
        .where(
            InboxEvent.project_id == project.id,
            col(InboxEvent.error).is_not(None),
            col(InboxEvent.processed_at) >= now - REFUSED_EVENT_WINDOW,  # refused then
        )
    ).one()
    return f"{refused} labeling event(s) refused in the last hour" if refused else None


def _no_labels_for_a_day(session: Session, project: Project, now: datetime) -> str | None:
    waiting = session.exec(
        select(func.count())
        .select_from(Item)
        .where(
            Item.project_id == project.id,
            col(Item.status).in_([ItemStatus.SELECTED, ItemStatus.QUEUED]),
        )
    ).one()
    if not waiting:
        return None
    newest = session.execute(
        sa.select(func.max(col(Annotation.created_at))).where(
            col(Annotation.project_id) == project.id,
            col(Annotation.source).in_(HUMAN_SOURCES),
            col(Annotation.cancelled).is_(False),
        )
    ).scalar_one()
    if newest is None or now - newest <= LABEL_SILENCE:
        return None
    return f"no labels for {(now - newest).days} day(s) while {waiting} items wait"


# alert name (as in alerts.yml) -> (severity, condition)
ALERT_RULES: dict[str, tuple[str, Rule]] = {
    "FocalloopClassRecallBelowTarget": ("warning", _recall_below_target),
    "FocalloopHardExampleRateSpike": ("warning", _hard_example_spike),
    "FocalloopGateRejectingEveryModel": ("warning", _gate_rejecting),
    "FocalloopCyclesFailing": ("critical", _cycles_failing),
    "FocalloopWebhookRejections": ("warning", _events_refused),
    "FocalloopNoLabelsForADay": ("warning", _no_labels_for_a_day),
}


def firing(session: Session, project: Project, *, now: datetime | None = None) -> list[Firing]:
    """The project's alerts whose condition holds at `now` (default: now), in rule order."""
    moment = now or utcnow()
    found = []
    for name, (severity, rule) in ALERT_RULES.items():
        summary = rule(session, project, moment)
        if summary is not None:
            found.append(Firing(name, severity, summary))
    return found
