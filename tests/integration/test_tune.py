"""`focalloop tune` on real deployments: a study on each state backend (Optuna's storage beside
it, never in it), search from cross-entropy, bad input. The study on real Celery workers that
loses a pool process mid-trial is tests/faults/test_tune_worker_killed.py."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from services import db
from services.config import Settings
from services.datasets.pool import add_to_pool
from services.datasets.snapshot import snapshot
from services.errors import Conflict, InvalidInput, PermanentError
from services.projects import ProjectSpec, create_project
from services.tuning.coordinator import tune_project
from services.tuning.run import TrialRequest, TuneOptions, run_request
from services.tuning.studies import begin, list_studies, results, status
from services.tuning.study import exclusive
from tests.conftest import Digits
from tests.integration.conftest import unique_name

pytestmark = pytest.mark.timeout(300)
# One gamma row: three cells, each trained on two folds (the grid's size is the unit tests').
SMALL_GRID = TuneOptions(gammas=(0.0,), folds=2, repeats=1)


def labeled_project(
    engine: sa.Engine, settings: Settings, digits: Digits, folder: Path, *, labeled: bool = True
) -> str:
    """A binary project ("other" vs "eight", 10 eights among 150) whose 150 pool items carry
    seed labels, committed as dataset v1 (no version at all when `labeled` is False)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = np.concatenate(
        [np.flatnonzero(digits.labels != 8)[:140], np.flatnonzero(digits.labels == 8)[:10]]
    )
    np.savez(
        folder / "pool.npz",
        features=digits.features[rows],
        item_ids=np.array([f"d{i:04d}" for i in rows]),
        labels=np.where(digits.labels[rows] == 8, "eight", "other"),
    )
    name = unique_name("tune")
    with db.session_scope(engine) as session:
        project = create_project(
            session,
            ProjectSpec(
                name=name,
                labels=["other", "eight"],
                modality="features",
                store_url=f"file://{folder / 'store'}",
            ),
        )
        if labeled:
            add_to_pool(
                session,
                project,
                str(folder / "pool.npz"),
                settings=settings,
                trusted_roots=[f"file://{folder}"],
            )
            snapshot(session, project, settings=settings)
    return name


def test_a_study_runs_on_each_state_backend_beside_the_state(
    engine: sa.Engine, settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    name = labeled_project(engine, settings, digits, tmp_path / "p")
    progress: list[tuple[int, int]] = []
    summary = tune_project(
        engine,
        settings,
        name,
        SMALL_GRID,
        out=tmp_path / "out",
        on_progress=lambda done, total: progress.append((done, total)),
    )
    assert progress[-1] == (3, 3)
    assert len(summary["heatmap"]["cells"]) == 3 and summary["minority_class"] == "eight"
    assert summary["labels"] == 150 and summary["failed"] == 0
    written = json.loads((tmp_path / "out" / "tuning.json").read_text())
    assert written["heatmap"] == summary["heatmap"]
    # Optuna's tables live outside the state database's schema, and its Alembic version table
    # never replaced ours.
    with engine.connect() as connection:
        ours = set(sa.inspect(connection).get_table_names())
    assert not any(table.startswith(("studies", "trials", "trial_")) for table in ours)
    assert db.current_revision(engine) == db.head_revision()  # ours, not Optuna's "v3.x.y"
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            optuna_tables = set(sa.inspect(connection).get_table_names(schema="optuna"))
        assert {"studies", "trials"} <= optuna_tables
    # While one study runs (its trials sent, none back yet), another is refused; one whose
    # workers went away (no trial for longer than the stale time) is abandoned instead.
    sent: list[TrialRequest] = []
    running, _ = begin(engine, settings, name, SMALL_GRID, dispatch=sent.append)
    assert len(sent) == 3 and status(running).state == "running"
    with pytest.raises(Conflict, match=r"still running \(0 of 3 trials done\)"):
        begin(engine, settings, name, SMALL_GRID, dispatch=sent.append)
    with pytest.raises(Conflict, match="no results yet"):
        results(running)
    # A trial whose dataset rows changed since the study began is recorded failed, not run on
    # other folds than the rest.
    changed = replace(sent[0], rows_sha="0" * 64)
    with pytest.raises(PermanentError, match="no longer holds the training rows"):
        run_request(engine, settings, changed)
    assert (status(running).done, status(running).failed) == (1, 1)
    later, _ = begin(engine, settings, name, SMALL_GRID, dispatch=sent.append, stale_s=0.0)
    assert status(running).state == "abandoned" and status(later).state == "running"
    assert [s.state for s in list_studies(engine, name)] == ["complete", "abandoned", "running"]
    # The check-and-record is one critical section (on PostgreSQL an advisory lock: any host).
    with exclusive(engine, name), pytest.raises(Conflict, match="already running"):
        tune_project(engine, settings, name, SMALL_GRID, out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_search_starts_from_cross_entropy_and_bad_input_changes_nothing(
    settings: Settings, digits: Digits, tmp_path: Path
) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'state.db'}")
    db.upgrade(engine)
    name = labeled_project(engine, settings, digits, tmp_path / "p")
    search = TuneOptions(mode="search", trials=2, folds=2, repeats=1, metric="recall:eight")
    summary = tune_project(engine, settings, name, search, out=tmp_path / "out")
    assert summary["ce"] is not None and summary["ce"]["gamma"] == 0.0
    assert summary["trials"] == 2 and summary["metric"] == "recall:eight"
    bad = [
        (TuneOptions(metric="recall:cat"), "no class 'cat'"),
        (TuneOptions(metric="auc"), "unknown metric 'auc'"),
        (TuneOptions(gammas=(1.0, 1.0)), "gamma 1 is given more than once"),
        (TuneOptions(gammas=(0.0, -1.0)), "gamma must be in"),
        (TuneOptions(folds=11), "every class needs at least 11 labels for 11 folds"),
    ]
    for options, message in bad:
        with pytest.raises(InvalidInput, match=message):
            tune_project(engine, settings, name, options, out=tmp_path / "bad")
    unlabeled = labeled_project(engine, settings, digits, tmp_path / "q", labeled=False)
    with pytest.raises(InvalidInput, match="has no dataset version yet"):
        tune_project(engine, settings, unlabeled, SMALL_GRID, out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    engine.dispose()
