"""A tuning study on Optuna: the grid (one trial per cell, each added when its folds are done) or
TPE search (ask and tell, cross-entropy first, median pruning after each fold).

Storage sits beside the state database but never in it, so Optuna's tables and its Alembic
history (`alembic_version`, which ours uses too) never meet ours: a PostgreSQL state database
gets an `optuna` schema on the same server; a SQLite one an Optuna SQLite file next to it.
Workers on other hosts reach PostgreSQL as they reach the state; SQLite is one host, as it is
for the state.

What a worker dying does: a grid cell is written only once all its folds ran (or as failed when
it raised), so a cell lost with its worker is simply run again by the redelivered task, and a
cell already written is never run twice; a search trial that was asked for but never told stays
RUNNING, and `fail_orphans` marks it failed once every dispatched trial has reported.
Workers record a heartbeat on the study after every fold, so a long cell is not taken for an
abandoned study.
"""

import contextlib
import fcntl
import hashlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy as sa
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from services.errors import Conflict
from services.recipe import Recipe
from services.tuning.evaluate import Metric, TrialOutcome, TuningData, run_trial
from services.tuning.folds import Fold
from services.tuning.space import (
    ALPHA_SCHEMES,
    BINARY_ALPHA_RANGE,
    BINARY_PREFIX,
    GAMMA_RANGE,
    Setting,
    check_setting,
)

# Optuna logs every trial at INFO; the command shows its own progress and table.
optuna.logging.set_verbosity(optuna.logging.WARNING)

OUTCOME_ATTR = "outcome"  # a trial's TrialOutcome.to_dict(), as a user attribute
OPTUNA_SCHEMA = "optuna"


@dataclass(frozen=True)
class StudyPlan:
    """What to run: mode "grid" (the `grid` settings, no pruning) or "search" (`trials` TPE
    trials, gamma = 0 first, median pruning on the metric after each fold)."""

    mode: str
    metric: Metric
    trials: int
    grid: tuple[Setting, ...] = ()
    # Folds per repeat: the pruner waits for one whole repeat, since a single fold's rare-class
    # F1 rests on a handful of items and would prune good settings by chance.
    warmup_folds: int = 3


def storage_url(state_url: str) -> tuple[str, dict[str, object]]:
    """Optuna's storage URL and engine options for a state database URL (module docstring)."""
    url = sa.make_url(state_url)
    if url.get_backend_name() == "sqlite":
        database = Path(url.database or "focalloop.db").expanduser()
        beside = database.with_name(database.name + ".optuna.sqlite")
        # Two worker processes may write at once: wait for the lock instead of failing.
        return f"sqlite:///{beside}", {"connect_args": {"timeout": 30}}
    options: dict[str, object] = {"connect_args": {"options": f"-csearch_path={OPTUNA_SCHEMA}"}}
    return url.render_as_string(hide_password=False), options


def storage_exists(engine: sa.Engine) -> bool:
    """Whether any study was ever stored for this state database (without creating storage)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            found = connection.execute(
                sa.text("SELECT 1 FROM information_schema.schemata WHERE schema_name = :name"),
                {"name": OPTUNA_SCHEMA},
            ).first()
        return found is not None
    url, _ = storage_url(engine.url.render_as_string(hide_password=False))
    return Path(sa.make_url(url).database or "").is_file()


def storage(engine: sa.Engine) -> RDBStorage:
    """The study storage for the state database `engine` connects to (created on first use)."""
    url, options = storage_url(engine.url.render_as_string(hide_password=False))
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}"))
    return RDBStorage(url, engine_kwargs=options)


@contextlib.contextmanager
def exclusive(engine: sa.Engine, project: str) -> Iterator[None]:
    """Hold the project's tuning lock for the block; Conflict when another `tune` holds it.

    PostgreSQL: a session advisory lock (any host); SQLite: a file lock next to the database."""
    refused = Conflict(
        f"a tuning study of project {project!r} is already running; wait for it to finish"
    )
    if engine.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"tune:{project}".encode()).digest()[:8], "big")
        key -= 1 << 63  # a signed bigint
        with engine.connect() as connection:
            held = connection.execute(sa.select(sa.func.pg_try_advisory_lock(key))).scalar()
            if not held:
                raise refused
            try:
                yield
            finally:
                connection.execute(sa.select(sa.func.pg_advisory_unlock(key)))
        return
    database = Path(engine.url.database or "focalloop.db").expanduser()
    lock_file = database.with_name(f"{database.name}.tune-{project}.lock")
    handle = os.open(lock_file, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise refused from None
        yield
    finally:
        os.close(handle)  # closing releases the lock


def open_study(
    engine: sa.Engine, name: str, plan: StudyPlan, *, seed: int, create: bool = False
) -> optuna.Study:
    """Create the study (`create`: DuplicatedStudyError if the name is taken) or load it, with
    the plan's sampler and pruner (Optuna keeps neither); a new search study gets
    cross-entropy enqueued first."""
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=plan.warmup_folds)
        if plan.mode == "search"
        else optuna.pruners.NopPruner()
    )
    # constant_liar: trials run in parallel on several workers; without it TPE would propose
    # nearly the same point to each of them.
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if not create:
        return optuna.load_study(
            study_name=name, storage=storage(engine), sampler=sampler, pruner=pruner
        )
    study = optuna.create_study(
        study_name=name,
        storage=storage(engine),
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
    )
    if plan.mode == "search":
        study.enqueue_trial(CROSS_ENTROPY_PARAMS)
    return study


CROSS_ENTROPY_PARAMS: dict[str, float | str] = {"gamma": 0.0, "alpha": "none"}
HEARTBEAT_ATTR = "heartbeat"


def heartbeat(study: optuna.Study) -> None:
    """Say the study is being worked on (read by `studies`' staleness check)."""
    study.set_user_attr(HEARTBEAT_ATTR, time.time())


def _alpha_choices(n_classes: int) -> list[str]:
    return [*ALPHA_SCHEMES, "binary"] if n_classes == 2 else list(ALPHA_SCHEMES)


def _suggest(trial: optuna.Trial, n_classes: int) -> Setting:
    gamma = trial.suggest_float("gamma", *GAMMA_RANGE)
    alpha = str(trial.suggest_categorical("alpha", _alpha_choices(n_classes)))
    if alpha == "binary":
        value = trial.suggest_float("binary_alpha", *BINARY_ALPHA_RANGE)
        alpha = f"{BINARY_PREFIX}{value:.3g}"
    return check_setting(Setting(gamma, alpha), n_classes)


def cells_with_trials(study: optuna.Study, states: tuple[TrialState, ...]) -> set[Setting]:
    """Grid cells that have a trial in one of `states`."""
    return {
        Setting(float(trial.params["gamma"]), str(trial.params["alpha"]))
        for trial in study.get_trials(deepcopy=False, states=states)
    }


ENDED = (TrialState.COMPLETE, TrialState.FAIL)


def _cell_distributions() -> dict[str, optuna.distributions.BaseDistribution]:
    return {
        "gamma": FloatDistribution(*GAMMA_RANGE),
        "alpha": CategoricalDistribution(list(ALPHA_SCHEMES)),
    }


def run_grid_cell(
    study: optuna.Study,
    setting: Setting,
    data: TuningData,
    folds: list[Fold],
    recipe: Recipe,
    metric: Metric,
) -> TrialOutcome | None:
    """Run one grid cell and add it to the study as a complete trial, or as a failed one
    (re-raising) when it raises; None when the cell already ended (a redelivered task)."""
    if setting in cells_with_trials(study, ENDED):
        return None

    def after_fold(_step: int, _value: float) -> bool:
        heartbeat(study)
        return False  # the grid is never pruned: every cell of the heatmap needs every fold

    try:
        outcome = run_trial(setting, data, folds, recipe, metric, after_fold)
    except Exception as error:
        record_failure(study, setting, f"{type(error).__name__}: {error}")
        raise
    value = outcome.mean(metric)
    study.add_trial(
        optuna.trial.create_trial(
            params={"gamma": setting.gamma, "alpha": setting.alpha},
            distributions=_cell_distributions(),
            value=value if math.isfinite(value) else 0.0,
            user_attrs={OUTCOME_ATTR: outcome.to_dict()},
        )
    )
    return outcome


def record_failure(study: optuna.Study, cell: Setting | None, reason: str) -> None:
    """Record a trial that could not run: grid cell `cell` as failed, or (None) a failed
    search trial."""
    attrs = {"error": reason[:1000]}
    if cell is None:
        trial = study.ask()
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        study.tell(trial, state=TrialState.FAIL)
        return
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.FAIL,
            params={"gamma": cell.gamma, "alpha": cell.alpha},
            distributions=_cell_distributions(),
            user_attrs=attrs,
        )
    )


def run_search_trial(
    study: optuna.Study, data: TuningData, folds: list[Fold], recipe: Recipe, metric: Metric
) -> TrialOutcome:
    """Ask the study for a setting, run it fold by fold (reporting the metric after each so the
    pruner can stop a poor one), and tell the study how it ended. Cross-entropy is enqueued
    again first if its trial was lost with a worker, so the baseline is always evaluated."""
    trials = study.get_trials(deepcopy=False)
    alive = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    if not any(t.params == CROSS_ENTROPY_PARAMS and t.state in alive for t in trials):
        study.enqueue_trial(CROSS_ENTROPY_PARAMS, skip_if_exists=True)
    trial = study.ask()
    setting = _suggest(trial, len(data.class_names))

    def after_fold(step: int, value: float) -> bool:
        heartbeat(study)
        trial.report(value, step)
        return trial.should_prune()

    try:
        outcome = run_trial(setting, data, folds, recipe, metric, after_fold)
    except BaseException as error:
        trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:1000])
        study.tell(trial, state=TrialState.FAIL)
        raise
    trial.set_user_attr(OUTCOME_ATTR, outcome.to_dict())
    if outcome.pruned:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        value = outcome.mean(metric)
        study.tell(trial, value if math.isfinite(value) else 0.0)
    return outcome


def accounted(study: optuna.Study, plan: StudyPlan) -> int:
    """Trials that reached an end: grid cells written (complete or failed), or search trials
    told (any state)."""
    if plan.mode == "grid":
        return len(cells_with_trials(study, ENDED) & set(plan.grid))
    return sum(1 for trial in study.get_trials(deepcopy=False) if trial.state.is_finished())


def remaining(study: optuna.Study, plan: StudyPlan) -> int:
    target = len(plan.grid) if plan.mode == "grid" else plan.trials
    return max(0, target - accounted(study, plan))


def fail_orphans(study: optuna.Study) -> int:
    """Mark failed the trials still RUNNING although nothing runs them any more (their worker
    died after asking); call only when every dispatched trial has reported. Two readers may do
    this at once: a trial the other already failed is skipped. Returns how many."""
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in orphans:
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    return len(orphans)
