"""`focalloop tune`: tune a project's gamma and alpha on its newest dataset version.

Everything but the loss is the project's own: its training rows (labels people gave; held
evaluation items excluded, released ones included, as every cycle trains), its recipe, the
architecture its next cycle would build for that many labels. Repeated stratified k-fold
(default 3 x 3) gives every setting the same folds and the same per-fold training seeds.

The coordinator (`tune_project`) opens the study and hands out trials as `TrialRequest`s: to
`run_request` in its own process, or to Celery workers on the gpu queue (the `dispatch` the
caller gives), which run the same function. Either way it then reads the outcome from the
study, so a result never travels through the broker.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from services.config import Settings
from services.cycle.data import project_store, training_data
from services.cycle.seeds import Purpose, derive_seed
from services.datasets.versions import latest_version
from services.db import session_scope
from services.errors import InvalidInput
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
    run_grid_cell,
    run_search_trial,
)

MODES = ("grid", "search")


@dataclass(frozen=True)
class TuneOptions:
    """mode: "grid" (gammas x the alpha schemes) or "search" (`trials` Optuna TPE trials).
    metric: "minority_f1", "macro_f1" or "recall:CLASS" (a label name)."""

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

    def study_name(self, version: int) -> str:
        gammas = ",".join(f"{g:g}" for g in self.gammas) if self.mode == "grid" else "tpe"
        return f"v{version}-{self.mode}-{gammas}-{self.metric}-{self.repeats}x{self.folds}"


@dataclass(frozen=True)
class TrialRequest:
    """One unit of work of study `study`: a grid cell (`gamma`, `alpha` given) or one search
    trial (None)."""

    project: str
    study: str
    options: dict[str, Any]
    gamma: float | None = None
    alpha: str | None = None


def parse_metric(text: str, class_names: list[str], rare_class: int) -> Metric:
    """InvalidInput for an unknown metric or class."""
    if text == "minority_f1":
        return Metric("f1", rare_class)
    if text == "macro_f1":
        return Metric("macro_f1")
    if text.startswith("recall:"):
        name = text.removeprefix("recall:")
        if name not in class_names:
            raise InvalidInput(f"--metric {text}: no class {name!r}; classes: {class_names}")
        return Metric("recall", class_names.index(name))
    raise InvalidInput(f"unknown --metric {text!r}; choose minority_f1, macro_f1 or recall:CLASS")


def load_tuning_data(engine: sa.Engine, settings: Settings, project_name: str) -> TuningData:
    """The newest dataset version's training rows; InvalidInput when there is none."""
    with session_scope(engine) as session:
        project = get_project(session, project_name)
        version = latest_version(project_store(project, settings), project.name)
        if version is None:
            raise InvalidInput(
                f"project {project_name!r} has no dataset version yet: label items first"
            )
        items, labels, _ = training_data(session, project, version, settings)
        return TuningData(
            items=items,
            labels=labels,
            class_names=list(project.labels),
            seed=project.seed,
            version=version,
        )


@dataclass(frozen=True)
class Prepared:
    data: TuningData
    folds: list[Fold]
    plan: StudyPlan
    study_name: str


def prepare(engine: sa.Engine, settings: Settings, project: str, options: TuneOptions) -> Prepared:
    """Everything a trial needs, derived the same way in the coordinator and every worker;
    InvalidInput for bad options or too few labels."""
    if options.mode not in MODES:
        raise InvalidInput(f"unknown mode {options.mode!r}; choose grid or search")
    if options.mode == "search" and options.trials < 1:
        raise InvalidInput(f"--trials must be at least 1, got {options.trials}")
    data = load_tuning_data(engine, settings, project)
    metric = parse_metric(options.metric, data.class_names, data.rare_class)
    cells = tuple(grid(len(data.class_names), options.gammas)) if options.mode == "grid" else ()
    folds = make_folds(
        data.labels,
        folds=options.folds,
        repeats=options.repeats,
        seed=derive_seed(data.seed, data.version, Purpose.TUNE, 0),
        class_names=data.class_names,
    )
    plan = StudyPlan(mode=options.mode, metric=metric, trials=options.trials, grid=cells)
    return Prepared(data, folds, plan, options.study_name(data.version))


def run_request(engine: sa.Engine, settings: Settings, request: TrialRequest) -> None:
    """Run one trial (what a gpu worker's task does): a grid cell, skipped when already written,
    or one search trial."""
    options = TuneOptions.from_dict(request.options)
    prepared = prepare(engine, settings, request.project, options)
    with session_scope(engine) as session:
        project = get_project(session, request.project)
        recipe = project_recipe(project, device=settings.device, threads=settings.torch_threads)
    study = open_study(engine, request.study, prepared.plan, seed=prepared.data.seed)
    if request.gamma is not None and request.alpha is not None:
        setting = Setting(request.gamma, request.alpha)
        run_grid_cell(study, setting, prepared.data, prepared.folds, recipe, prepared.plan.metric)
    else:
        run_search_trial(study, prepared.data, prepared.folds, recipe, prepared.plan.metric)


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
        rare_class = list(project.labels).index(summary["minority_class"])
        loss = to_loss(setting, LossSpec.from_dict(project.loss_config), rare_class=rare_class)
        update_project(session, project_name, loss=loss.to_dict())
        audit(session, {"loss": loss.to_dict(), "study": summary["study"]})
        return loss.to_dict()
