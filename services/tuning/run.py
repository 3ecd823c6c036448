"""`focalloop tune`: tune a project's gamma and alpha on its newest dataset version.

Everything but the loss is the project's own: its training rows (labels people gave; held
evaluation items excluded, released ones included, as every cycle trains), its recipe, the
architecture its next cycle would build for that many labels. Repeated stratified k-fold
(default 3 x 3) gives every setting the same folds and the same per-fold training seeds.

A study (`studies.begin`) hands out its trials as `TrialRequest`s: to `run_request` in the
caller's process, or to Celery workers on the gpu queue (a `Dispatch`), which run the same
function. Results are read back from the study, so none travels through the broker.
"""

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import sqlalchemy as sa

from services.config import Settings
from services.cycle.data import project_store, training_data
from services.cycle.seeds import Purpose, derive_seed
from services.datasets.versions import latest_version
from services.db import session_scope
from services.errors import InvalidInput, PermanentError
from services.ml.train import LossSpec
from services.projects import get_project, update_project
from services.recipe import project_recipe
from services.tuning import TRIAL_TASK
from services.tuning.evaluate import Metric, TuningData
from services.tuning.folds import Fold, make_folds
from services.tuning.space import GRID_GAMMAS, Setting, check_setting, grid, to_loss
from services.tuning.study import (
    StudyPlan,
    open_study,
    record_failure,
    run_grid_cell,
    run_search_trial,
)

MODES = ("grid", "search")


@dataclass(frozen=True)
class TuneOptions:
    """mode: "grid" (gammas x the alpha schemes) or "search" (`trials` Optuna TPE trials).
    metric: "minority_f1" (the class with the fewest labels), "macro_f1", "recall:CLASS" or
    "f1:CLASS" (a label name)."""

    mode: str = "grid"
    trials: int = 30
    folds: int = 3
    repeats: int = 3
    metric: str = "minority_f1"
    gammas: tuple[float, ...] = GRID_GAMMAS

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gammas": list(self.gammas)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TuneOptions":
        return cls(**{**data, "gammas": tuple(float(g) for g in data["gammas"])})

    def checked(self) -> "TuneOptions":
        """These options with the grid's gammas as run: -0 read as 0, cross-entropy (0) added
        when missing (the baseline is always evaluated), in increasing order. InvalidInput for
        an unknown mode, no trials, a gamma given twice, or gammas with a search."""
        if self.mode not in MODES:
            raise InvalidInput(f"unknown mode {self.mode!r}; choose grid or search")
        if self.trials < 1:
            raise InvalidInput(f"trials must be at least 1, got {self.trials}")
        gammas = [abs(g) if g == 0 else g for g in self.gammas]
        if self.mode == "search":
            if tuple(gammas) != GRID_GAMMAS:
                raise InvalidInput("gammas set the grid; a search draws gamma from [0, 5] itself")
            return self
        repeated = sorted({g for g in gammas if gammas.count(g) > 1})
        if repeated:
            raise InvalidInput(f"gamma {repeated[0]:g} is given more than once")
        return replace(self, gammas=tuple(sorted({0.0, *gammas})))


@dataclass(frozen=True)
class TrialRequest:
    """One unit of work of study `study`: a grid cell (`gamma`, `alpha` given) or one search
    trial (None), on dataset `version` whose training rows digest to `rows_sha`."""

    project: str
    study: str
    options: dict[str, Any]
    version: int
    rows_sha: str
    gamma: float | None = None
    alpha: str | None = None


def parse_metric(text: str, class_names: list[str], rare_class: int) -> Metric:
    """InvalidInput for an unknown metric or class."""
    if text == "minority_f1":
        return Metric("f1", rare_class)
    if text == "macro_f1":
        return Metric("macro_f1")
    kind, _, name = text.partition(":")
    if kind in ("recall", "f1") and name:
        if name not in class_names:
            raise InvalidInput(f"metric {text}: no class {name!r}; classes: {class_names}")
        return Metric(kind, class_names.index(name))
    raise InvalidInput(
        f"unknown metric {text!r}; choose minority_f1, macro_f1, recall:CLASS or f1:CLASS"
    )


def load_tuning_data(
    engine: sa.Engine, settings: Settings, project_name: str, version: int | None = None
) -> TuningData:
    """Dataset `version`'s training rows (the newest version's when None); InvalidInput when
    the project has no version yet."""
    with session_scope(engine) as session:
        project = get_project(session, project_name)
        if version is None:
            version = latest_version(project_store(project, settings), project.name)
        if version is None:
            raise InvalidInput(
                f"project {project_name!r} has no dataset version yet: label items first"
            )
        items, labels, item_ids = training_data(session, project, version, settings)
        digest = hashlib.sha256(item_ids.astype(np.int64).tobytes())
        digest.update(labels.astype(np.int64).tobytes())
        return TuningData(
            items=items,
            labels=labels,
            class_names=list(project.labels),
            seed=project.seed,
            version=version,
            rows_sha=digest.hexdigest(),
        )


@dataclass(frozen=True)
class Prepared:
    options: TuneOptions  # as checked
    data: TuningData
    folds: list[Fold]
    plan: StudyPlan


def prepare(
    engine: sa.Engine,
    settings: Settings,
    project: str,
    options: TuneOptions,
    version: int | None = None,
) -> Prepared:
    """Everything a trial needs, derived the same way in the coordinator and every worker, on
    dataset `version` (the newest when None); InvalidInput for bad options or too few labels."""
    options = options.checked()
    data = load_tuning_data(engine, settings, project, version)
    metric = parse_metric(options.metric, data.class_names, data.rare_class)
    cells = tuple(grid(len(data.class_names), options.gammas)) if options.mode == "grid" else ()
    folds = make_folds(
        data.labels,
        folds=options.folds,
        repeats=options.repeats,
        seed=derive_seed(data.seed, data.version, Purpose.TUNE, 0),
        class_names=data.class_names,
    )
    plan = StudyPlan(
        mode=options.mode,
        metric=metric,
        trials=options.trials,
        grid=cells,
        warmup_folds=options.folds,
    )
    return Prepared(options, data, folds, plan)


def run_request(engine: sa.Engine, settings: Settings, request: TrialRequest) -> None:
    """Run one trial (what a gpu worker's task does): a grid cell, skipped when already written,
    or one search trial. When the study's training rows changed since it began (evaluation
    items released into training, say), the trial is recorded as failed instead: its folds
    would not be the other trials' folds."""
    options = TuneOptions.from_dict(request.options)
    prepared = prepare(engine, settings, request.project, options, request.version)
    with session_scope(engine) as session:
        project = get_project(session, request.project)
        recipe = project_recipe(project, device=settings.device, threads=settings.torch_threads)
    study = open_study(engine, request.study, prepared.plan, seed=prepared.data.seed)
    cell = None
    if request.gamma is not None and request.alpha is not None:
        cell = Setting(request.gamma, request.alpha)
    if prepared.data.rows_sha != request.rows_sha:
        message = (
            f"dataset v{request.version} of {request.project!r} no longer holds the training "
            "rows the study began with (evaluation items released into training?)"
        )
        record_failure(study, cell, message)
        raise PermanentError(message + "; the trial is recorded as failed")
    data, folds, metric = prepared.data, prepared.folds, prepared.plan.metric
    if cell is not None:
        run_grid_cell(study, cell, data, folds, recipe, metric)
    else:
        run_search_trial(study, data, folds, recipe, metric)


Dispatch = Callable[[TrialRequest], None]


def celery_dispatch(settings: Settings) -> Dispatch:
    """Send each trial to the gpu queue of the broker in `settings`."""
    from celery import Celery

    from services.heartbeats import GPU_QUEUE

    sender = Celery("focalloop-tune", broker=settings.broker_url)

    def send(request: TrialRequest) -> None:
        sender.send_task(TRIAL_TASK, args=[asdict(request)], queue=GPU_QUEUE)

    return send


def apply_best(
    engine: sa.Engine,
    project_name: str,
    summary: dict[str, Any],
    audit: Callable[[Any, dict[str, Any]], None],
) -> dict[str, Any]:
    """Set the project's loss to the study's best setting (checked by the project's own loss
    validation) and `audit(session, detail)` it in the same transaction; returns the new loss."""
    best = summary["best"]
    with session_scope(engine) as session:
        project = get_project(session, project_name, for_update=True)
        setting = check_setting(Setting(best["gamma"], best["alpha"]), len(project.labels))
        # The class the trials' binary scalar alpha weighed, which need not be the class the
        # metric named.
        rare_class = list(project.labels).index(summary["alpha_class"])
        loss = to_loss(setting, LossSpec.from_dict(project.loss_config), rare_class=rare_class)
        update_project(session, project_name, loss=loss.to_dict())
        audit(session, {"loss": loss.to_dict(), "study": summary["study"]})
        return loss.to_dict()
