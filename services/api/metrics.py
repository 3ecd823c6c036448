"""Prometheus metrics, read from the state database at scrape time.

Workers write everything that matters (cycles, chunks, models, labels) to the database, so the
API exports it from there: one source of truth, correct across any number of worker processes
and restarts, with no multiprocess bookkeeping. Only webhook outcomes are counted in the API
process, since the API is what receives them.
"""

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlmodel import col, func, select

from services.db import session_scope
from services.gate import gate_config
from services.models import (
    Annotation,
    Cycle,
    CycleState,
    InboxEvent,
    Item,
    ItemStatus,
    LabelTask,
    LabelTaskState,
    ModelVersion,
    Project,
    Promotion,
    ScoreChunk,
)
from services.promotion import rejections_in_a_row
from services.status import HUMAN_SOURCES, cycle_view, headline_report, supported_recalls

# Cycle durations span seconds (a cold start) to hours (a large pool on one GPU).
DURATION_BUCKETS_S = (
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    43200.0,
)


class StateCollector(Collector):
    """Every focalloop_* metric derived from the database, per project."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        cycles = GaugeMetricFamily(
            "focalloop_cycles", "Cycles by state.", labels=["project", "state"]
        )
        failed = CounterMetricFamily(
            "focalloop_cycles_failed", "Cycles that ended failed.", labels=["project"]
        )
        durations = HistogramMetricFamily(
            "focalloop_cycle_duration_seconds",
            "Wall time of finished (done) cycles, creation to end.",
            labels=["project"],
        )
        scored = CounterMetricFamily(
            "focalloop_items_scored", "Items scored by all cycles' chunks.", labels=["project"]
        )
        scoring_rate = GaugeMetricFamily(
            "focalloop_items_scored_per_second",
            "Items scored per second of the scoring state, in the newest cycle that scored.",
            labels=["project"],
        )
        queue = GaugeMetricFamily(
            "focalloop_queue_depth",
            "Items selected or queued for labeling, not yet answered.",
            labels=["project"],
        )
        reviews = GaugeMetricFamily(
            "focalloop_reviews_pending",
            "Label-noise review tasks not answered.",
            labels=["project"],
        )
        recall = GaugeMetricFamily(
            "focalloop_model_recall",
            "The current model's recall per class (evaluation set, else validation split).",
            labels=["project", "class"],
        )
        target = GaugeMetricFamily(
            "focalloop_recall_target",
            "Recall the operators expect per class.",
            labels=["project", "class"],
        )
        hard = GaugeMetricFamily(
            "focalloop_model_hard_example_rate",
            "The current model's share of labeled held-out items with p_t below the threshold.",
            labels=["project"],
        )
        macro_f1 = GaugeMetricFamily(
            "focalloop_model_macro_f1", "The current model's macro-F1.", labels=["project"]
        )
        version = GaugeMetricFamily(
            "focalloop_model_version", "The current model's version number.", labels=["project"]
        )
        rejected = CounterMetricFamily(
            "focalloop_models_rejected", "Models the promotion gate rejected.", labels=["project"]
        )
        in_a_row = GaugeMetricFamily(
            "focalloop_gate_rejections_in_a_row",
            "The newest models the gate rejected one after another (0 after a promotion).",
            labels=["project"],
        )
        gate_alerting = GaugeMetricFamily(
            "focalloop_gate_alert",
            "1 while the gate rejected at least alert_after_rejections models in a row.",
            labels=["project"],
        )
        labels_total = CounterMetricFamily(
            "focalloop_labels", "Human answers stored (skips excluded).", labels=["project"]
        )
        last_label = GaugeMetricFamily(
            "focalloop_last_label_timestamp_seconds",
            "Unix time of the newest human answer stored.",
            labels=["project"],
        )
        refused = CounterMetricFamily(
            "focalloop_label_events_refused",
            "Labeling-tool events refused at ingest (unknown label, foreign task, ...).",
            labels=["project"],
        )
        applied = CounterMetricFamily(
            "focalloop_label_events_applied",
            "Labeling-tool events ingest applied (stored answers, withdrawals, duplicates).",
            labels=["project"],
        )
        waiting = GaugeMetricFamily(
            "focalloop_label_events_pending",
            "Labeling-tool events stored and not yet ingested.",
            labels=["project"],
        )
        with session_scope(self.engine) as session:
            for project in session.exec(select(Project).order_by(col(Project.name))).all():
                name = project.name
                pid = project.id
                states = dict(
                    session.execute(
                        sa.select(col(Cycle.state), func.count())
                        .where(col(Cycle.project_id) == pid)
                        .group_by(col(Cycle.state))
                    ).all()
                )
                for state in CycleState:
                    cycles.add_metric([name, state.value], int(states.get(state.value, 0)))
                failed.add_metric([name], int(states.get(CycleState.FAILED.value, 0)))
                self._durations(session, durations, name, pid)
                scored.add_metric(
                    [name],
                    int(
                        session.execute(
                            sa.select(func.coalesce(func.sum(col(ScoreChunk.items_scored)), 0))
                            .join(Cycle, col(Cycle.id) == col(ScoreChunk.cycle_id))
                            .where(col(Cycle.project_id) == pid)
                        ).scalar_one()
                    ),
                )
                newest_scored = session.exec(
                    select(Cycle)
                    .where(Cycle.project_id == pid, col(Cycle.chunks_total) > 0)
                    .where(Cycle.state == CycleState.DONE)
                    .order_by(col(Cycle.id).desc())
                ).first()
                if newest_scored is not None:
                    rate = cycle_view(session, newest_scored).scoring_items_per_s
                    if rate is not None:
                        scoring_rate.add_metric([name], rate)
                queue.add_metric(
                    [name],
                    int(
                        session.exec(
                            select(func.count())
                            .select_from(Item)
                            .where(
                                Item.project_id == pid,
                                col(Item.status).in_([ItemStatus.SELECTED, ItemStatus.QUEUED]),
                            )
                        ).one()
                    ),
                )
                reviews.add_metric(
                    [name],
                    int(
                        session.exec(
                            select(func.count())
                            .select_from(LabelTask)
                            .where(
                                LabelTask.project_id == pid,
                                LabelTask.kind == "review",
                                LabelTask.state != LabelTaskState.ANSWERED,
                            )
                        ).one()
                    ),
                )
                self._model(session, project, recall, hard, macro_f1, version)
                for label, value in gate_config(project).recall_targets.items():
                    target.add_metric([name, label], float(value))
                rejected.add_metric(
                    [name],
                    int(
                        session.exec(
                            select(func.count())
                            .select_from(ModelVersion)
                            .where(
                                ModelVersion.project_id == pid,
                                ModelVersion.promotion == Promotion.REJECTED,
                            )
                        ).one()
                    ),
                )
                streak = rejections_in_a_row(session, project)
                in_a_row.add_metric([name], streak)
                gate_alerting.add_metric(
                    [name], int(streak >= gate_config(project).alert_after_rejections)
                )
                count, newest = session.execute(
                    sa.select(func.count(), func.max(col(Annotation.created_at))).where(
                        col(Annotation.project_id) == pid,
                        col(Annotation.source).in_(HUMAN_SOURCES),
                        col(Annotation.cancelled).is_(False),
                    )
                ).one()
                labels_total.add_metric([name], int(count))
                if newest is not None:
                    last_label.add_metric([name], _timestamp(newest))
                events = {"refused": 0, "applied": 0, "pending": 0}
                for processed, failed_event, count in session.execute(
                    sa.select(
                        col(InboxEvent.processed_at).is_not(None),
                        col(InboxEvent.error).is_not(None),
                        func.count(),
                    )
                    .where(col(InboxEvent.project_id) == pid)
                    .group_by(
                        col(InboxEvent.processed_at).is_not(None),
                        col(InboxEvent.error).is_not(None),
                    )
                ):
                    outcome = "refused" if failed_event else "applied" if processed else "pending"
                    events[outcome] += int(count)
                refused.add_metric([name], events["refused"])
                applied.add_metric([name], events["applied"])
                waiting.add_metric([name], events["pending"])
        yield from (
            cycles,
            failed,
            durations,
            scored,
            scoring_rate,
            queue,
            reviews,
            recall,
            target,
            hard,
            macro_f1,
            version,
            rejected,
            in_a_row,
            gate_alerting,
            labels_total,
            last_label,
            refused,
            applied,
            waiting,
        )

    @staticmethod
    def _durations(session: Any, family: HistogramMetricFamily, name: str, pid: int | None) -> None:
        rows = session.execute(
            sa.select(col(Cycle.created_at), col(Cycle.finished_at)).where(
                col(Cycle.project_id) == pid,
                col(Cycle.state) == CycleState.DONE,
                col(Cycle.finished_at).is_not(None),
            )
        ).all()
        seconds = [(end - start).total_seconds() for start, end in rows]
        buckets = [
            (str(bound), sum(1 for s in seconds if s <= bound)) for bound in DURATION_BUCKETS_S
        ] + [("+Inf", len(seconds))]
        family.add_metric([name], buckets, sum_value=sum(seconds))

    @staticmethod
    def _model(
        session: Any,
        project: Project,
        recall: GaugeMetricFamily,
        hard: GaugeMetricFamily,
        macro_f1: GaugeMetricFamily,
        version: GaugeMetricFamily,
    ) -> None:
        model = session.exec(
            select(ModelVersion).where(
                ModelVersion.project_id == project.id,
                ModelVersion.promotion == Promotion.CURRENT,
            )
        ).first()
        if model is None:
            return
        version.add_metric([project.name], model.version)
        _, report = headline_report(model.metrics)
        if report is None:
            return
        # A class the report had no items of has no recall; exporting 0.0 would fire the
        # recall alert for a class that was never measured.
        for label, value in supported_recalls(model.metrics, list(project.labels)).items():
            recall.add_metric([project.name, label], value)
        hard.add_metric([project.name], report["hard_example_rate"])
        macro_f1.add_metric([project.name], report["macro_f1"])


def _timestamp(moment: Any) -> float:
    return float(moment.timestamp())


def metrics_registry(engine: sa.Engine) -> tuple[CollectorRegistry, Counter]:
    """A registry for one app: the database collector plus the webhook outcome counter."""
    registry = CollectorRegistry()
    registry.register(StateCollector(engine))
    webhooks = Counter(
        "focalloop_webhook_events",
        "Label Studio webhook deliveries at the door by outcome, counted by this API process: "
        "stored (kept for ingest, which may still refuse it: see "
        "focalloop_label_events_applied / _refused / _pending), duplicate, ignored, rejected.",
        labelnames=["outcome"],
        registry=registry,
    )
    for outcome in ("stored", "duplicate", "ignored", "rejected"):
        webhooks.labels(outcome=outcome)
    return registry, webhooks
