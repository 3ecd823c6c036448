"""`focalloop tune`'s parts without a deployment: the space, the folds, the metric, a small grid
and search study on real digits, the outputs, the lock."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from services.errors import Conflict, InvalidInput
from services.ml.train import LossSpec, TrainConfig
from services.recipe import default_recipe
from services.tuning.evaluate import Metric, TuningData
from services.tuning.folds import Fold, make_folds
from services.tuning.report import outcome_from_dict, summarize, write_outputs
from services.tuning.run import TuneOptions, parse_metric
from services.tuning.space import Setting, check_setting, grid, to_loss
from services.tuning.study import (
    OUTCOME_ATTR,
    StudyPlan,
    exclusive,
    fail_orphans,
    open_study,
    remaining,
    run_grid_cell,
    run_search_trial,
)
from tests.conftest import Digits

pytestmark = pytest.mark.timeout(300)
CLASSES = [str(c) for c in range(10)]
# The project's recipe, shortened: these tests check the plumbing, not what tuning finds.
FAST = replace(default_recipe(), train=TrainConfig(max_epochs=15, patience=15, threads=1))


def test_the_grid_is_the_guides_fifteen_settings_cross_entropy_first() -> None:
    cells = grid(10)
    assert len(cells) == 15 and len(set(cells)) == 15
    assert cells[:3] == [Setting(0.0, a) for a in ("none", "inverse_frequency", "effective_number")]
    assert {c.gamma for c in cells} == {0.0, 0.5, 1.0, 2.0, 3.0}


@pytest.mark.parametrize(
    ("setting", "classes", "message"),
    [
        (Setting(-0.5, "none"), 10, "gamma must be in [0, 5], got -0.5"),
        (Setting(6.0, "none"), 10, "gamma must be in [0, 5], got 6"),
        (Setting(1.0, "balanced"), 10, "unknown alpha 'balanced'"),
        (Setting(1.0, "binary:0.25"), 10, "for binary projects; this one has 10 classes"),
        (Setting(1.0, "binary:1.5"), 2, "a binary alpha must be in [0.1, 1], got 1.5"),
        (Setting(1.0, "binary:x"), 2, "alpha 'binary:x' is not a number"),
    ],
)
def test_bad_settings_are_refused(setting: Setting, classes: int, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_setting(setting, classes)


def test_grid_options_are_checked_and_always_hold_cross_entropy() -> None:
    with pytest.raises(InvalidInput, match="gamma must be in"):
        grid(10, gammas=(0.0, -1.0))
    assert TuneOptions(gammas=(2.0, 1.0)).checked().gammas == (0.0, 1.0, 2.0)
    assert TuneOptions(gammas=(-0.0, 2.0)).checked().gammas == (0.0, 2.0)
    with pytest.raises(InvalidInput, match="gamma 1 is given more than once"):
        TuneOptions(gammas=(1.0, 2.0, 1.0)).checked()
    with pytest.raises(InvalidInput, match="gammas set the grid"):
        TuneOptions(mode="search", gammas=(1.0,)).checked()
    with pytest.raises(InvalidInput, match="unknown mode 'anneal'"):
        TuneOptions(mode="anneal").checked()


def test_settings_become_the_projects_loss() -> None:
    base = LossSpec(kind="focal", gamma=2.0, alpha="effective_number", prior_bias=True, beta=0.99)
    plain = to_loss(Setting(0.0, "none"), base, rare_class=3)
    assert (plain.gamma, plain.alpha, plain.prior_bias, plain.beta) == (0.0, None, True, 0.99)
    assert to_loss(Setting(1.0, "inverse_frequency"), base, rare_class=3).alpha == (
        "inverse_frequency"
    )
    # The guides' scalar alpha weighs the rare class, wherever it sits.
    assert to_loss(Setting(2.0, "binary:0.25"), base, rare_class=1).alpha == (0.75, 0.25)
    assert to_loss(Setting(2.0, "binary:0.25"), base, rare_class=0).alpha == (0.25, 0.75)


def test_folds_hold_every_class_and_scarce_classes_are_refused() -> None:
    labels = np.repeat(np.arange(3), [40, 30, 4])
    folds = make_folds(labels, folds=3, repeats=2, seed=1, class_names=["a", "b", "c"])
    assert [(f.repeat, f.number) for f in folds] == [(r, n) for r in range(2) for n in range(3)]
    for fold in folds:
        assert set(labels[fold.held]) == {0, 1, 2}
        assert len(np.intersect1d(fold.train, fold.held)) == 0
        assert len(fold.train) + len(fold.held) == len(labels)
    with pytest.raises(InvalidInput, match="at least 5 labels for 5 folds: 'c' has 4"):
        make_folds(labels, folds=5, repeats=1, seed=1, class_names=["a", "b", "c"])
    with pytest.raises(InvalidInput, match="folds must be at least 2"):
        make_folds(labels, folds=1, repeats=1, seed=1, class_names=["a", "b", "c"])


def test_metrics_are_parsed_or_refused() -> None:
    assert parse_metric("minority_f1", CLASSES, 8) == Metric("f1", 8)
    assert parse_metric("macro_f1", CLASSES, 8) == Metric("macro_f1")
    assert parse_metric("recall:3", CLASSES, 8) == Metric("recall", 3)
    assert parse_metric("f1:3", CLASSES, 8) == Metric("f1", 3)
    with pytest.raises(InvalidInput, match="unknown metric 'f1:'"):
        parse_metric("f1:", CLASSES, 8)
    with pytest.raises(InvalidInput, match="no class 'cat'"):
        parse_metric("recall:cat", CLASSES, 8)
    with pytest.raises(InvalidInput, match="unknown metric 'auc'"):
        parse_metric("auc", CLASSES, 8)


def _engine(tmp_path: Path) -> sa.Engine:
    """A state database URL to put the study beside (Optuna's own SQLite file)."""
    return sa.create_engine(f"sqlite:///{tmp_path / 'state.db'}")


def _digits_data(digits: Digits) -> TuningData:
    """200 digits with the eights cut to 12: a rare class every 2-fold split still holds."""
    rows = np.concatenate(
        [np.flatnonzero(digits.labels != 8)[:188], np.flatnonzero(digits.labels == 8)[:12]]
    )
    return TuningData(
        items=digits.features[rows],
        labels=digits.labels[rows],
        class_names=CLASSES,
        seed=7,
        version=1,
    )


def test_a_grid_study_fills_one_heatmap_cell_per_grid_point(digits: Digits, tmp_path: Path) -> None:
    data = _digits_data(digits)
    assert data.rare_class == 8
    folds = make_folds(data.labels, folds=2, repeats=1, seed=0, class_names=CLASSES)
    plan = StudyPlan(
        mode="grid", metric=Metric("f1", 8), trials=0, grid=tuple(grid(10, (0.0, 2.0)))
    )
    engine = _engine(tmp_path)
    study = open_study(engine, "grid", plan, seed=0, create=True)
    assert remaining(study, plan) == 6
    for setting in plan.grid:
        assert run_grid_cell(study, setting, data, folds, FAST, plan.metric) is not None
    ran = [Setting(t.params["gamma"], t.params["alpha"]) for t in study.trials]
    assert sorted(ran, key=str) == sorted(plan.grid, key=str)
    assert (tmp_path / "state.db.optuna.sqlite").is_file()  # beside the state database
    # Reopened by a redelivered task: a cell already written never runs twice.
    again = open_study(engine, "grid", plan, seed=0)
    assert run_grid_cell(again, plan.grid[0], data, folds, FAST, plan.metric) is None
    assert remaining(again, plan) == 0 and len(again.trials) == 6
    outcomes = [outcome_from_dict(t.user_attrs[OUTCOME_ATTR]) for t in again.trials]
    summary = summarize(
        outcomes,
        metric=plan.metric,
        metric_label="minority_f1",
        rare_class=8,
        class_names=CLASSES,
        context={"project": "digits"},
    )
    cells = summary["heatmap"]["cells"]
    assert len(cells) == 6 and summary["heatmap"]["gammas"] == [0.0, 2.0]
    assert {(c["gamma"], c["alpha"]) for c in cells} == {(s.gamma, s.alpha) for s in plan.grid}
    for entry in cells:
        assert entry["folds"] == 2
        assert 0.0 <= entry["metric_ci95"][0] <= entry["metric"] <= entry["metric_ci95"][1] <= 1
        assert entry["metric"] == entry["minority_f1"]  # the metric is the minority F1 here
    assert summary["ce"]["gamma"] == 0.0 and summary["ce"]["alpha"] == "none"
    assert summary["best"]["metric"] == max(c["metric"] for c in cells)
    assert len(summary["per_class_recall"]["best"]) == 10
    assert [p["gamma"] for p in summary["validation_curve"]["points"]] == [0.0, 2.0]
    paths = write_outputs(summary, tmp_path / "out")
    assert json.loads(paths[0].read_text())["heatmap"]["cells"] == cells
    for png in paths[1:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_search_study_tries_cross_entropy_first_and_accounts_for_every_trial(
    digits: Digits, tmp_path: Path
) -> None:
    data = _digits_data(digits)
    folds = make_folds(data.labels, folds=2, repeats=2, seed=0, class_names=CLASSES)
    plan = StudyPlan(mode="search", metric=Metric("macro_f1"), trials=5)
    study = open_study(_engine(tmp_path), "search", plan, seed=3, create=True)
    for _ in range(remaining(study, plan)):
        run_search_trial(study, data, folds, FAST, plan.metric)
    first = study.trials[0]
    assert first.params == {"gamma": 0.0, "alpha": "none"}
    assert len(study.trials) == 5
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    for trial in study.trials:
        outcome = outcome_from_dict(trial.user_attrs[OUTCOME_ATTR])
        assert 0.0 <= outcome.setting.gamma <= 5.0
        assert len(outcome.folds) == (len(folds) if trial.state == TrialState.COMPLETE else 1)
    # A trial asked for by a worker that then died stays RUNNING until the coordinator, once
    # every dispatched trial has reported, marks it failed.
    orphan = study.ask()
    assert fail_orphans(study) == 1
    assert study.trials[orphan.number].state == TrialState.FAIL
    assert remaining(study, plan) == 0


def test_a_second_study_of_a_project_is_refused_while_one_runs(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    with exclusive(engine, "digits"):
        refused = pytest.raises(Conflict, match="a tuning study of project 'digits' is already")
        with refused, exclusive(engine, "digits"):
            pass
        with exclusive(engine, "other"):  # another project is not held up
            pass
    with exclusive(engine, "digits"):  # released when the first ended
        pass


def test_a_grid_cell_that_raises_is_recorded_failed_and_counts_as_ended(
    digits: Digits, tmp_path: Path
) -> None:
    data = _digits_data(digits)
    plan = StudyPlan(mode="grid", metric=Metric("f1", 8), trials=0, grid=tuple(grid(10, (0.0,))))
    study = open_study(_engine(tmp_path), "broken", plan, seed=0, create=True)
    broken = [Fold(repeat=0, number=0, train=np.array([10_000]), held=np.array([0]))]
    with pytest.raises(IndexError):
        run_grid_cell(study, plan.grid[0], data, broken, FAST, plan.metric)
    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    assert failed.params == {"gamma": 0.0, "alpha": "none"}
    assert "IndexError" in failed.user_attrs["error"]
    assert remaining(study, plan) == 2  # the study can still close: the cell has ended
    assert run_grid_cell(study, plan.grid[0], data, broken, FAST, plan.metric) is None
