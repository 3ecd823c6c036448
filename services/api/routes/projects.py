"""Projects, their pool and items: create, list, get, update, pause/resume, add to the pool."""

from typing import Annotated

from fastapi import APIRouter, Path, status
from sqlmodel import col, func, select
from starlette.concurrency import run_in_threadpool

from services.api.deps import CreateDep, EngineDep, ReadDep, SessionDep, SettingsDep, WriteDep
from services.api.schemas import (
    ERRORS,
    ItemPublic,
    PoolAdd,
    PoolAddPublic,
    PoolPublic,
    ProjectCreate,
    ProjectPublic,
    ProjectUpdate,
)
from services.audit import record
from services.datasets.pool import add_to_pool
from services.db import session_scope
from services.models import Item
from services.projects import (
    ProjectSpec,
    api_store_url,
    create_project,
    get_project,
    list_projects,
    pool_counts,
    set_paused,
    update_project,
)
from services.status import item_history

router = APIRouter(prefix="/api/v1/projects", tags=["projects"], responses=ERRORS)
ProjectName = Annotated[str, Path(min_length=1, max_length=40)]


@router.post("", response_model=ProjectPublic, status_code=status.HTTP_201_CREATED)
def create(
    body: ProjectCreate, session: SessionDep, settings: SettingsDep, who: CreateDep
) -> ProjectPublic:
    """Create a project. Its dataset store must lie under FOCALLOOP_STORE_ROOTS (default: a
    folder of its own under the data dir)."""
    spec = ProjectSpec(
        name=body.name,
        labels=body.labels,
        modality=body.modality,
        store_url=api_store_url(settings, body.name, body.store_url),
        image_size=body.image_size,
        image_channels=body.image_channels,
        loss=body.loss,
        selection=body.selection,
        batch_size=body.batch_size,
        label_budget=body.label_budget,
        retrain_min_new_labels=body.retrain_min_new_labels,
        retrain_cron=body.retrain_cron,
        refill_below=body.refill_below,
        gate=body.gate,
        seed=body.seed,
    )
    project = create_project(session, spec)
    record(
        session,
        actor=who.actor,
        action="project.create",
        project_id=project.id,
        target=project.name,
    )
    return ProjectPublic.of(project)


@router.get("", response_model=list[ProjectPublic])
def list_all(session: SessionDep, who: ReadDep) -> list[ProjectPublic]:
    """Every project the token may see, by name."""
    return [
        ProjectPublic.of(project)
        for project in list_projects(session)
        if who.project_id is None or project.id == who.project_id
    ]


@router.get("/{project}", response_model=ProjectPublic)
def get(project: ProjectName, session: SessionDep, _: ReadDep) -> ProjectPublic:
    return ProjectPublic.of(get_project(session, project))


@router.patch("/{project}", response_model=ProjectPublic)
def update(
    project: ProjectName, body: ProjectUpdate, session: SessionDep, who: WriteDep
) -> ProjectPublic:
    """Change settings; fields left out stay, `label_budget` or `retrain_cron` given as null
    are unset. loss/selection/gate merge into the current ones."""
    row = update_project(
        session,
        project,
        labels=body.labels,
        batch_size=body.batch_size,
        label_budget=body.label_budget,
        retrain_min_new_labels=body.retrain_min_new_labels,
        retrain_cron=body.retrain_cron,
        refill_below=body.refill_below,
        loss=body.loss,
        selection=body.selection,
        gate=body.gate,
        seed=body.seed,
        clear=body.cleared(),
    )
    record(
        session,
        actor=who.actor,
        action="project.update",
        project_id=row.id,
        target=row.name,
        detail=body.model_dump(exclude_unset=True),
    )
    return ProjectPublic.of(row)


def _set_paused(session: SessionDep, project: str, actor: str, paused: bool) -> ProjectPublic:
    row = set_paused(session, project, paused=paused)
    record(
        session,
        actor=actor,
        action="project.pause" if paused else "project.resume",
        project_id=row.id,
        target=row.name,
    )
    return ProjectPublic.of(row)


@router.post("/{project}/pause", response_model=ProjectPublic)
def pause(project: ProjectName, session: SessionDep, who: WriteDep) -> ProjectPublic:
    """Beat starts no cycles for a paused project (a running cycle finishes)."""
    return _set_paused(session, project, who.actor, True)


@router.post("/{project}/resume", response_model=ProjectPublic)
def resume(project: ProjectName, session: SessionDep, who: WriteDep) -> ProjectPublic:
    return _set_paused(session, project, who.actor, False)


def _evaluation_set_size(session: SessionDep, project_id: int | None) -> int:
    return int(
        session.exec(
            select(func.count())
            .select_from(Item)
            .where(Item.project_id == project_id, col(Item.eval_set).is_(True))
        ).one()
    )


@router.get("/{project}/pool", response_model=PoolPublic, tags=["pool"])
def pool(project: ProjectName, session: SessionDep, _: ReadDep) -> PoolPublic:
    """Items by status, disagreements, and the evaluation set's size."""
    row = get_project(session, project)
    return PoolPublic.of(pool_counts(session, row), _evaluation_set_size(session, row.id))


@router.post("/{project}/pool", response_model=PoolAddPublic, tags=["pool"])
async def add(
    project: ProjectName, body: PoolAdd, engine: EngineDep, settings: SettingsDep, who: WriteDep
) -> PoolAddPublic:
    """Register a source's items (deduplicated by content). Only sources under
    FOCALLOOP_SOURCE_ROOTS are read."""

    def run() -> PoolAddPublic:
        with session_scope(engine) as session:
            row = get_project(session, project, for_update=True)
            report = add_to_pool(
                session, row, body.source, settings=settings, trusted_roots=settings.source_roots
            )
            record(
                session,
                actor=who.actor,
                action="pool.add",
                project_id=row.id,
                target=body.source,
                detail={"added": report.added, "duplicates": report.duplicates},
            )
        return PoolAddPublic(
            source=report.source,
            seen=report.seen,
            added=report.added,
            duplicates=report.duplicates,
            seed_labels=report.seed_labels,
            unreadable=report.unreadable,
            shards=len(report.shards),
        )

    return await run_in_threadpool(run)


@router.get("/{project}/items/{item_id:path}", response_model=ItemPublic, tags=["pool"])
def item(project: ProjectName, item_id: str, session: SessionDep, _: ReadDep) -> ItemPublic:
    """One item (by its external id) with every answer it received, oldest first."""
    history = item_history(session, get_project(session, project), item_id)
    return ItemPublic.of(history.item, history.annotations)
