"""A study's life, the same from the command line and the API: `begin` (checked, refused while
another study of the project runs, recorded, its trials handed out), `status` (progress; once
every trial has reported, the study is closed: orphaned trials failed, state complete),
`results` (the summary of a complete study).

What a study is for lives in its `plan` user attribute (project, options, what the metric and
the rare class are, how many trials), so any process can report on it from the storage alone.
A study is "running" until closed; one whose last trial ended (or which began) more than
`stale_s` ago, with trials still missing, is taken as abandoned (its coordinator and workers
are gone) and no longer holds up a new one.
"""

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import optuna
import sqlalchemy as sa

from services.config import Settings
from services.errors import Conflict, NotFound, TransientError
from services.tuning.evaluate import Metric
from services.tuning.report import outcome_from_dict, summarize
from services.tuning.run import Dispatch, TrialRequest, TuneOptions, prepare, run_request
from services.tuning.space import Setting
from services.tuning.study import (
    ENDED,
    HEARTBEAT_ATTR,
    OUTCOME_ATTR,
    StudyPlan,
    accounted,
    cells_with_trials,
    exclusive,
    fail_orphans,
    open_study,
    remaining,
    storage,
    storage_exists,
)

log = logging.getLogger(__name__)

PLAN_ATTR = "plan"
RUNNING, COMPLETE, ABANDONED = "running", "complete", "abandoned"
STALE_S = 3600.0


@dataclass(frozen=True)
class StudyStatus:
    """Where a study stands: done of total trials ended (failed and pruned among them)."""

    name: str
    project: str
    state: str
    mode: str
    metric: str
    dataset_version: int
    done: int
    total: int
    failed: int
    pruned: int
    started_at: str

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _summaries(engine: sa.Engine, project: str) -> Iterator[optuna.study.StudySummary]:
    for summary in optuna.get_all_study_summaries(storage(engine), include_best_trial=False):
        if summary.user_attrs.get(PLAN_ATTR, {}).get("project") == project:
            yield summary


def _plan_of(study: optuna.Study) -> StudyPlan:
    plan = study.user_attrs[PLAN_ATTR]
    options = TuneOptions.from_dict(plan["options"])
    metric = Metric(plan["metric"]["name"], plan["metric"]["class_index"])
    cells = tuple(Setting(float(cell["gamma"]), str(cell["alpha"])) for cell in plan["grid"])
    return StudyPlan(
        mode=options.mode,
        metric=metric,
        trials=options.trials,
        grid=cells,
        warmup_folds=options.folds,
    )


def _last_activity(study: optuna.Study) -> float:
    """When the study was last worked on: begun, a fold's heartbeat, a trial's end."""
    began = datetime.fromisoformat(study.user_attrs[PLAN_ATTR]["started_at"]).timestamp()
    trials = study.get_trials(deepcopy=False)
    ended = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete]
    return max([began, float(study.user_attrs.get(HEARTBEAT_ATTR, 0.0)), *ended])


def begin(
    engine: sa.Engine,
    settings: Settings,
    project: str,
    options: TuneOptions,
    *,
    dispatch: Dispatch | None,
    stale_s: float = STALE_S,
) -> tuple[optuna.Study, list[TrialRequest]]:
    """Check the options (InvalidInput: nothing is recorded), refuse while another study of the
    project runs (Conflict), record a new study, and return it with its trial requests: sent
    to `dispatch` already when given, for the caller to run otherwise."""
    prepared = prepare(engine, settings, project, options)
    options = prepared.options
    with exclusive(engine, project):
        for summary in _summaries(engine, project):
            study = optuna.load_study(study_name=summary.study_name, storage=storage(engine))
            state = study.user_attrs[PLAN_ATTR]["state"]
            if state != RUNNING or _close_if_done(study):
                continue
            if time.time() - _last_activity(study) > stale_s:
                _set_state(study, ABANDONED)
                continue
            done, total = accounted(study, _plan_of(study)), study.user_attrs[PLAN_ATTR]["total"]
            raise Conflict(
                f"tuning study {summary.study_name!r} of project {project!r} is still running "
                f"({done} of {total} trials done); wait for it to finish"
            )
        # The project's name and a count: unique across projects (a project name never ends
        # in "-N" where another's count could), safe in a URL, and what a person types. Counted
        # from the names, so a study left without its plan (a crash right after creating it)
        # still takes its number.
        numbered = re.compile(rf"{re.escape(project)}-(\d+)")
        taken = [
            int(match.group(1))
            for existing in optuna.get_all_study_names(storage(engine))
            if (match := numbered.fullmatch(existing))
        ]
        name = f"{project}-{max(taken, default=0) + 1}"
        study = open_study(engine, name, prepared.plan, seed=prepared.data.seed, create=True)
        plan = prepared.plan
        total = len(plan.grid) if plan.mode == "grid" else plan.trials
        study.set_user_attr(
            PLAN_ATTR,
            {
                "project": project,
                "options": options.to_dict(),
                "metric": {"name": plan.metric.name, "class_index": plan.metric.class_index},
                "grid": [{"gamma": s.gamma, "alpha": s.alpha} for s in plan.grid],
                "total": total,
                "state": RUNNING,
                "started_at": datetime.now(UTC).isoformat(),
                "dataset_version": prepared.data.version,
                "rows_sha": prepared.data.rows_sha,
                "labels": len(prepared.data.labels),
                # The class the heatmaps' precision, recall and F1 are of: the one the metric
                # names, else the one with the fewest labels.
                "rare_class": plan.metric.class_index
                if plan.metric.class_index is not None
                else prepared.data.rare_class,
                "class_names": prepared.data.class_names,
                # The class a binary scalar alpha weighs in every trial (the rarer one).
                "fewest_labels_class": prepared.data.rare_class,
            },
        )
    requests = _requests(study, options)
    if dispatch is not None:
        try:
            for request in requests:
                dispatch(request)
        except Exception as error:
            # The broker is down: the trials sent so far run, but nobody would ever send the
            # rest, so the study would never close. Give it up now rather than block the project.
            _set_state(study, ABANDONED)
            raise TransientError(
                f"the broker did not take the study's trials ({error}); study {name!r} was "
                "abandoned, start again once the broker is back"
            ) from error
    return study, requests


def _requests(study: optuna.Study, options: TuneOptions) -> list[TrialRequest]:
    plan, recorded = _plan_of(study), study.user_attrs[PLAN_ATTR]
    common = {
        "project": recorded["project"],
        "study": study.study_name,
        "options": options.to_dict(),
        "version": recorded["dataset_version"],
        "rows_sha": recorded["rows_sha"],
    }
    if plan.mode == "grid":
        ended = cells_with_trials(study, ENDED)
        return [
            TrialRequest(**common, gamma=cell.gamma, alpha=cell.alpha)
            for cell in plan.grid
            if cell not in ended
        ]
    return [TrialRequest(**common)] * remaining(study, plan)


def run_here(
    engine: sa.Engine,
    settings: Settings,
    study: optuna.Study,
    requests: list[TrialRequest],
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Run a study's requests in this process. A trial that raises is recorded as failed and
    the rest go on, as on workers; an interrupt abandons the study."""
    plan, total = _plan_of(study), study.user_attrs[PLAN_ATTR]["total"]
    try:
        for request in requests:
            try:
                run_request(engine, settings, request)
            except Exception:
                log.exception("tuning trial of %s failed", study.study_name)
            if on_progress is not None:
                on_progress(accounted(study, plan), total)
    except BaseException:
        _set_state(study, ABANDONED)
        raise


def _set_state(study: optuna.Study, state: str) -> None:
    study.set_user_attr(PLAN_ATTR, {**study.user_attrs[PLAN_ATTR], "state": state})


def _close_if_done(study: optuna.Study) -> bool:
    """Close a running study once every trial reported; whether it is closed now."""
    plan = study.user_attrs[PLAN_ATTR]
    if plan["state"] == COMPLETE:
        return True
    if plan["state"] != RUNNING or accounted(study, _plan_of(study)) < plan["total"]:
        return False
    fail_orphans(study)
    _set_state(study, COMPLETE)
    return True


def load(engine: sa.Engine, project: str, name: str) -> optuna.Study:
    """The project's study `name`; NotFound otherwise (also where no study was ever stored:
    reading must not create the storage)."""
    stored = storage_exists(engine) and any(
        s.study_name == name for s in _summaries(engine, project)
    )
    if not stored:
        raise NotFound(f"project {project!r} has no tuning study {name!r}")
    return optuna.load_study(study_name=name, storage=storage(engine))


def status(study: optuna.Study) -> StudyStatus:
    """Progress, closing the study first when every trial has reported."""
    _close_if_done(study)
    plan = study.user_attrs[PLAN_ATTR]
    trials = study.get_trials(deepcopy=False)
    return StudyStatus(
        name=study.study_name,
        project=plan["project"],
        state=plan["state"],
        mode=plan["options"]["mode"],
        metric=plan["options"]["metric"],
        dataset_version=plan["dataset_version"],
        done=accounted(study, _plan_of(study)),
        total=plan["total"],
        failed=sum(1 for t in trials if t.state == optuna.trial.TrialState.FAIL),
        pruned=sum(1 for t in trials if t.state == optuna.trial.TrialState.PRUNED),
        started_at=plan["started_at"],
    )


def list_studies(engine: sa.Engine, project: str) -> list[StudyStatus]:
    """Every study of the project, oldest first (none, and no storage made, where no study
    was ever stored)."""
    if not storage_exists(engine):
        return []
    statuses = [
        status(optuna.load_study(study_name=s.study_name, storage=storage(engine)))
        for s in _summaries(engine, project)
    ]
    return sorted(statuses, key=lambda s: s.started_at)


def results(study: optuna.Study) -> dict[str, Any]:
    """The summary of a complete study (Conflict while it runs or after it was abandoned)."""
    current = status(study)
    if current.state != COMPLETE:
        raise Conflict(
            f"tuning study {current.name!r} is {current.state} ({current.done} of "
            f"{current.total} trials done): no results yet"
        )
    plan = study.user_attrs[PLAN_ATTR]
    options = plan["options"]
    outcomes = [
        outcome_from_dict(trial.user_attrs[OUTCOME_ATTR])
        for trial in study.get_trials(deepcopy=False)
        if OUTCOME_ATTR in trial.user_attrs
    ]
    if not outcomes or all(outcome.pruned for outcome in outcomes):
        raise Conflict(
            f"tuning study {current.name!r} has no trial that ran every fold "
            f"({current.failed} failed, {current.pruned} pruned): nothing to report"
        )
    return summarize(
        outcomes,
        metric=_plan_of(study).metric,
        metric_label=options["metric"],
        rare_class=plan["rare_class"],
        class_names=plan["class_names"],
        context={
            "project": plan["project"],
            "dataset_version": plan["dataset_version"],
            "labels": plan["labels"],
            "mode": options["mode"],
            "folds": options["folds"],
            "repeats": options["repeats"],
            "study": study.study_name,
            "failed": current.failed,
            "alpha_class": plan["class_names"][plan["fewest_labels_class"]],
        },
    )
