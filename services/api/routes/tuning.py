"""Tuning studies (`focalloop tune` through the API): start, list, status, results, heatmaps,
apply the best setting. Trials run on the gpu queue's workers; this process only records the
study and reads it back."""

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, status
from fastapi.responses import Response
from sqlmodel import Session

from services.api.deps import EngineDep, ReadDep, SessionDep, SettingsDep, WriteDep
from services.api.routes.projects import ProjectName
from services.api.schemas import ERRORS
from services.api.tuning_schemas import TuningStart, TuningStudyPublic
from services.audit import record
from services.db import session_scope
from services.heartbeats import GPU_QUEUE
from services.projects import get_project
from services.tuning import TRIAL_TASK
from services.tuning.report import heatmaps_png
from services.tuning.run import TrialRequest, TuneOptions, apply_best
from services.tuning.studies import begin, list_studies, load, results
from services.tuning.studies import status as study_status

router = APIRouter(prefix="/api/v1/projects/{project}/tuning", tags=["tuning"], responses=ERRORS)
StudyName = Annotated[str, Path(min_length=1, max_length=300)]


@router.get("", response_model=list[TuningStudyPublic])
def list_all(
    project: ProjectName, engine: EngineDep, session: SessionDep, _: ReadDep
) -> list[TuningStudyPublic]:
    """The project's studies, oldest first, with their progress."""
    get_project(session, project)
    return [TuningStudyPublic.of(each) for each in list_studies(engine, project)]


@router.post(
    "",
    response_model=TuningStudyPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses={409: {"description": "another study of the project is still running"}},
)
def start(
    request: Request,
    project: ProjectName,
    body: TuningStart,
    engine: EngineDep,
    settings: SettingsDep,
    who: WriteDep,
) -> TuningStudyPublic:
    """Begin a study on the newest dataset version and send its trials to the gpu queue.
    Refused with 422 for a bad metric, class, gamma or too few labels per class for the folds,
    409 while another study of the project runs; nothing is recorded then."""
    options = TuneOptions(
        mode=body.mode,
        trials=body.trials,
        folds=body.folds,
        repeats=body.repeats,
        metric=body.metric,
        gammas=tuple(body.gammas),
    )
    celery = request.app.state.celery

    def dispatch(trial: TrialRequest) -> None:
        celery.send_task(TRIAL_TASK, args=[asdict(trial)], queue=GPU_QUEUE)

    study, _ = begin(engine, settings, project, options, dispatch=dispatch)
    with session_scope(engine) as session:
        record(
            session,
            actor=who.actor,
            action="tuning.start",
            project_id=get_project(session, project).id,
            target=f"study:{study.study_name}"[:400],
            detail=options.to_dict(),
        )
    return TuningStudyPublic.of(study_status(study))


@router.get("/{name}", response_model=TuningStudyPublic)
def get(
    project: ProjectName, name: StudyName, engine: EngineDep, session: SessionDep, _: ReadDep
) -> TuningStudyPublic:
    """A study's progress: trials done of total, failed and pruned ones, its state."""
    get_project(session, project)
    return TuningStudyPublic.of(study_status(load(engine, project, name)))


@router.get(
    "/{name}/results",
    responses={409: {"description": "the study has not completed"}},
)
def get_results(
    project: ProjectName, name: StudyName, engine: EngineDep, session: SessionDep, _: ReadDep
) -> dict[str, Any]:
    """The figures `focalloop tune` writes to tuning.json: the heatmap cells, the best setting,
    cross-entropy's, the validation curve, per-class recall."""
    get_project(session, project)
    return results(load(engine, project, name))


@router.get(
    "/{name}/heatmaps.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "the heatmaps"},
        409: {"description": "the study has not completed"},
    },
)
def get_heatmaps(
    project: ProjectName, name: StudyName, engine: EngineDep, session: SessionDep, _: ReadDep
) -> Response:
    """Minority precision, recall, F1 and the chosen metric over gamma x alpha."""
    get_project(session, project)
    return Response(heatmaps_png(results(load(engine, project, name))), media_type="image/png")


@router.post(
    "/{name}/apply",
    responses={409: {"description": "the study has not completed"}},
)
def apply(
    project: ProjectName, name: StudyName, engine: EngineDep, session: SessionDep, who: WriteDep
) -> dict[str, Any]:
    """Set the project's loss to the study's best setting (audited); the next cycle uses it."""
    get_project(session, project)
    summary = results(load(engine, project, name))

    def audit(change: Session, detail: dict[str, Any]) -> None:
        record(
            change,
            actor=who.actor,
            action="project.tune",
            project_id=get_project(change, project).id,
            target=project,
            detail=detail,
        )

    return {"loss": apply_best(engine, project, summary, audit)}
