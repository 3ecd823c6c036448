"""Dataset versions: list, manifest summary, diff, lineage, export."""

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from services.api.deps import ReadDep, SessionDep, SettingsDep
from services.api.routes.projects import ProjectName
from services.api.schemas import ERRORS, DatasetVersionPublic, DiffPublic, RelabelPublic
from services.datasets.snapshot import get_version
from services.datasets.store import open_store
from services.datasets.tables import table_bytes
from services.datasets.versions import diff_versions, lineage, read_version
from services.projects import get_project
from services.status import committed_versions

router = APIRouter(
    prefix="/api/v1/projects/{project}/datasets", tags=["datasets"], responses=ERRORS
)
Version = Annotated[int, Path(ge=1, le=2**31 - 1)]
MEDIA_TYPES = {
    "csv": "text/csv",
    "jsonl": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}


@router.get("", response_model=list[DatasetVersionPublic])
def list_all(project: ProjectName, session: SessionDep, _: ReadDep) -> list[DatasetVersionPublic]:
    """Committed versions, newest first."""
    row = get_project(session, project)
    return [DatasetVersionPublic.of(version) for version in committed_versions(session, row)]


@router.get("/{version}", response_model=DatasetVersionPublic)
def get(
    project: ProjectName, version: Version, session: SessionDep, _: ReadDep
) -> DatasetVersionPublic:
    """A version's manifest summary: rows, class counts, parent, manifest hash."""
    return DatasetVersionPublic.of(get_version(session, get_project(session, project), version))


@router.get("/{version}/diff", response_model=DiffPublic)
def diff(
    project: ProjectName,
    version: Version,
    session: SessionDep,
    settings: SettingsDep,
    _: ReadDep,
    against: Annotated[int, Query(ge=1, le=2**31 - 1, description="The older version.")],
) -> DiffPublic:
    """Items added, withdrawn and relabeled from version `against` to this one."""
    row = get_project(session, project)
    get_version(session, row, version)
    get_version(session, row, against)
    result = diff_versions(open_store(row.store_url, settings), row.name, against, version)
    return DiffPublic(
        a=result.a,
        b=result.b,
        added=result.added,
        withdrawn=result.withdrawn,
        relabeled=[
            RelabelPublic(item_id=r.item_id, old=r.old, new=r.new) for r in result.relabeled
        ],
    )


@router.get("/{version}/lineage", response_model=list[int])
def version_lineage(
    project: ProjectName, version: Version, session: SessionDep, settings: SettingsDep, _: ReadDep
) -> list[int]:
    """This version and its ancestors, newest first (from the manifests' parent links)."""
    row = get_project(session, project)
    get_version(session, row, version)
    return lineage(open_store(row.store_url, settings), row.name, version)


@router.get(
    "/{version}/export",
    response_class=Response,
    responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}, "description": "rows"}},
)
def export(
    project: ProjectName,
    version: Version,
    session: SessionDep,
    settings: SettingsDep,
    _: ReadDep,
    format: Annotated[Literal["csv", "jsonl", "parquet"], Query()] = "jsonl",
) -> Response:
    """The version's rows (every object's hash verified) as CSV, JSON lines or Parquet."""
    row = get_project(session, project)
    get_version(session, row, version)
    table = read_version(open_store(row.store_url, settings), row.name, version)[1]
    return Response(
        table_bytes(table, format),
        media_type=MEDIA_TYPES[format],
        headers={"Content-Disposition": f'attachment; filename="{row.name}-v{version}.{format}"'},
    )
