"""What focalloop says about a project's health without Prometheus, on both state backends: the
alert rules of infra/prometheus/alerts.yml evaluated from the database (each made to hold, and
not), recall exported only for measured classes, "minority" figures only on skewed projects, and
training's progress written to the cycle row at most once per interval."""

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import select

from services import db
from services.alerts import firing
from services.api.app import create_app
from services.auth import create_token
from services.config import Settings
from services.cycle.progress import TrainingProgress
from services.ml.train import EpochDone
from services.models import (
    Annotation,
    Cycle,
    CycleState,
    DatasetVersion,
    DatasetVersionState,
    InboxEvent,
    Item,
    ItemStatus,
    ModelVersion,
    Project,
    Promotion,
    utcnow,
)
from services.projects import ProjectSpec, create_project, get_project
from tests.integration.conftest import insert_row, unique_name
from tests.integration.test_api import metric_values

pytestmark = pytest.mark.timeout(60)


def _report(recalls: list[tuple[float, int]], hard: float) -> dict[str, Any]:
    return {
        "n_items": sum(n for _, n in recalls),
        "macro_f1": 0.8,
        "minority_class": 1,
        "minority_f1": 0.5,
        "minority_recall": recalls[1][0],
        "hard_example_rate": hard,
        "hard_threshold": 0.5,
        "accuracy": 0.9,
        "ece": 0.05,
        "brier": 0.1,
        "focal_gamma": 2.0,
        "focal_loss_percentiles": {"p50": 0.01, "p90": 0.1, "p99": 1.0},
        "confusion": [
            [n if i == j else 0 for j in range(len(recalls))] for i, (_, n) in enumerate(recalls)
        ],
        "per_class": [
            {"label": c, "precision": 1.0, "recall": r, "f1": r, "support": n}
            for c, (r, n) in enumerate(recalls)
        ],
    }


def _model(
    project: Project, version: int, promotion: str, report: dict[str, Any], **kw: Any
) -> ModelVersion:
    return ModelVersion(
        project_id=project.id or 0,
        version=version,
        dataset_version=version,
        artifact_uri="file:///nowhere",
        parameters={},
        metrics={
            "labels": list(project.labels),
            "class_counts": kw.get("class_counts", {"ok": 90, "defect": 10, "scratch": 5}),
            "evaluation": report,
        },
        promotion=promotion,
        **{k: v for k, v in kw.items() if k != "class_counts"},
    )


def _project(engine: sa.Engine, tmp_path: Path, gate: dict[str, Any] | None = None) -> Project:
    with db.session_scope(engine) as session:
        return create_project(
            session,
            ProjectSpec(
                name=unique_name("alerts"),
                labels=["ok", "defect", "scratch"],
                modality="features",
                store_url=f"file://{tmp_path / 'store'}",
                gate=gate or {},
            ),
        )


def _fired(engine: sa.Engine, name: str) -> dict[str, str]:
    with db.session_scope(engine) as session:
        return {f.alert: f.summary for f in firing(session, get_project(session, name))}


def test_each_alert_rule_holds_when_its_condition_does(engine: sa.Engine, tmp_path: Path) -> None:
    project = _project(engine, tmp_path, gate={"recall_targets": {"defect": 0.9, "scratch": 0.9}})
    assert _fired(engine, project.name) == {}
    now = utcnow()
    # The current model misses the defect target; scratch had no evaluation item, so it has
    # no recall to compare (not a recall of 0).
    for version in (1, 2, 3):
        insert_row(
            engine,
            _model(
                project, version, Promotion.RETIRED, _report([(1, 50), (0.95, 20), (0, 0)], 0.02)
            ),
        )
    insert_row(
        engine, _model(project, 4, Promotion.CURRENT, _report([(1, 50), (0.6, 20), (0, 0)], 0.2))
    )
    fired = _fired(engine, project.name)
    assert fired["FocalloopClassRecallBelowTarget"] == "recall below target: defect 60% < 90% (m4)"
    assert (
        "hard-example rate 20% is over 1.5x its weekly average"
        in fired["FocalloopHardExampleRateSpike"]
    )
    assert "FocalloopGateRejectingEveryModel" not in fired
    for version in (5, 6, 7):
        insert_row(
            engine,
            _model(
                project, version, Promotion.REJECTED, _report([(1, 50), (0.6, 20), (0, 0)], 0.2)
            ),
        )
    assert (
        "rejected the newest 3 models"
        in _fired(engine, project.name)["FocalloopGateRejectingEveryModel"]
    )

    # A cycle failed 10 minutes ago counts; one failed two hours ago does not.
    insert_row(
        engine,
        Cycle(
            project_id=project.id or 0,
            number=1,
            state=CycleState.FAILED,
            trigger="t",
            finished_at=now - timedelta(hours=2),
        ),
    )
    assert "FocalloopCyclesFailing" not in _fired(engine, project.name)
    insert_row(
        engine,
        Cycle(
            project_id=project.id or 0,
            number=2,
            state=CycleState.FAILED,
            trigger="t",
            finished_at=now - timedelta(minutes=10),
        ),
    )
    assert (
        _fired(engine, project.name)["FocalloopCyclesFailing"]
        == "1 cycle(s) failed in the last hour"
    )

    insert_row(
        engine,
        InboxEvent(
            source="label_studio",
            event_key=unique_name("e"),
            action="ANNOTATION_CREATED",
            project_id=project.id,
            payload={},
            error="label 'x' is not in the label set",
            # Processed: a pending event would be picked up by other tests' ingest on the
            # shared PostgreSQL database.
            processed_at=now,
        ),
    )
    assert (
        "1 labeling event(s) refused" in _fired(engine, project.name)["FocalloopWebhookRejections"]
    )

    # Items wait, and the newest human answer is two days old.
    item = Item(
        project_id=project.id or 0,
        external_id="i1",
        uri="file:///i1",
        content_hash="a" * 64,
        status=ItemStatus.QUEUED,
        registered_from="file:///",
    )
    insert_row(engine, item)
    with db.session_scope(engine) as session:
        item_id = session.exec(select(Item.id).where(Item.project_id == project.id)).one()
    insert_row(
        engine,
        Annotation(
            project_id=project.id or 0,
            item_id=item_id or 0,
            label="ok",
            source="cli",
            external_id="a1",
            external_updated_at=now,
            annotator="ann",
            created_at=now - timedelta(days=2),
        ),
    )
    assert (
        _fired(engine, project.name)["FocalloopNoLabelsForADay"]
        == "no labels for 2 day(s) while 1 items wait"
    )


def test_metrics_and_model_summaries_say_only_what_was_measured(
    engine: sa.Engine, settings: Settings, tmp_path: Path
) -> None:
    project = _project(engine, tmp_path)
    insert_row(
        engine,
        _model(project, 1, Promotion.CURRENT, _report([(0.9, 50), (0.5, 10), (0.0, 0)], 0.1)),
    )
    balanced = _project(engine, tmp_path)
    insert_row(
        engine,
        _model(
            balanced,
            1,
            Promotion.CURRENT,
            _report([(0.9, 50), (0.5, 40), (0.7, 45)], 0.1),
            class_counts={"ok": 40, "defect": 35, "scratch": 30},
        ),
    )
    for owner in (project, balanced):
        insert_row(
            engine,
            DatasetVersion(
                project_id=owner.id or 0, version=1, state=DatasetVersionState.COMMITTED
            ),
        )
    with db.session_scope(engine) as session:
        _, token = create_token(session, name="m", scope="read", actor="test")
    with TestClient(create_app(settings, engine=engine)) as client:
        values = metric_values(client.get("/metrics").text)
        recalls = {
            dict(labels)["class"]: value
            for (name, labels), value in values.items()
            if name == "focalloop_model_recall" and dict(labels)["project"] == project.name
        }
        assert recalls == {"ok": 0.9, "defect": 0.5}  # scratch: never measured, not 0.0
        headers = {"Authorization": f"Bearer {token}"}
        answer = client.get(f"/api/v1/projects/{project.name}/models/1", headers=headers)
        assert answer.status_code == 200, answer.text
        skewed = answer.json()
        assert (skewed["summary"]["minority_class"], skewed["summary"]["minority_recall"]) == (
            "defect",
            0.5,
        )
        even = client.get(f"/api/v1/projects/{balanced.name}/models/1", headers=headers).json()
        assert (even["summary"]["minority_class"], even["summary"]["minority_f1"]) == (None, None)


def test_training_progress_reaches_the_cycle_row_at_most_once_per_interval(
    engine: sa.Engine, tmp_path: Path
) -> None:
    project = _project(engine, tmp_path)
    insert_row(
        engine, Cycle(project_id=project.id or 0, number=1, state=CycleState.TRAINING, trigger="t")
    )
    with db.session_scope(engine) as session:
        cycle_id = session.exec(select(Cycle.id).where(Cycle.project_id == project.id)).one() or 0
    clock = iter([0.0, 0.4, 0.8, 1.2, 1.3])
    # Attempt 1 holds the cycle; attempt 0 lost its lease and must not write over it.
    with db.session_scope(engine) as session:
        row = session.get(Cycle, cycle_id)
        assert row is not None
        row.train_attempts = 1
        session.add(row)
    TrainingProgress(engine, cycle_id, 0)(EpochDone(9, 9, 0.1, None))
    progress = TrainingProgress(engine, cycle_id, 1, interval_s=1.0, clock=lambda: next(clock))

    def epoch_row() -> int | None:
        with db.session_scope(engine) as session:
            row = session.get(Cycle, cycle_id)
            assert row is not None
            return None if row.progress is None else int(row.progress["epoch"])

    assert epoch_row() is None
    progress(EpochDone(1, 5, 0.9, 0.8))
    assert epoch_row() == 1
    progress(EpochDone(2, 5, 0.8, 0.7))  # 0.4 s later: skipped
    progress(EpochDone(3, 5, 0.7, 0.6))  # 0.8 s: skipped
    assert epoch_row() == 1
    progress(EpochDone(4, 5, 0.6, 0.5))  # 1.2 s: written
    assert epoch_row() == 4
    progress(EpochDone(5, 5, 0.5, 0.4))  # the last epoch is always written
    with db.session_scope(engine) as session:
        row = session.get(Cycle, cycle_id)
        assert row is not None and row.progress is not None
        assert (row.progress["epoch"], row.progress["epochs"], row.progress["val_loss"]) == (
            5,
            5,
            0.4,
        )
        # Not while the cycle is anywhere but training (a late write after it moved on).
        row.state = CycleState.SCORING
        row.progress = None
        session.add(row)
    TrainingProgress(engine, cycle_id, 1)(EpochDone(1, 5, 0.1, None))
    assert epoch_row() is None
