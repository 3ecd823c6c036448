"""Models: list, get with metrics, checkpoint download, promote, rollback, predict."""

import io
import zipfile
from typing import Annotated

import numpy as np
import sqlalchemy as sa
from fastapi import APIRouter, Path
from fastapi.responses import Response
from sqlmodel import col
from starlette.concurrency import run_in_threadpool

from services.api.deps import EngineDep, ReadDep, SessionDep, SettingsDep, WriteDep
from services.api.model_schemas import ModelPublic, Prediction, PredictPublic, PredictRequest
from services.api.routes.projects import ProjectName
from services.api.schemas import ERRORS
from services.artifacts import load_model, model_files
from services.artifacts import predict as predict_with
from services.cycle.data import load_items
from services.datasets.snapshot import model_lineage
from services.db import session_scope
from services.errors import InvalidInput, NotFound
from services.models import Item
from services.projects import get_project
from services.promotion import current_model, make_current
from services.status import get_model, list_models

router = APIRouter(prefix="/api/v1/projects/{project}", tags=["models"], responses=ERRORS)
Version = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.get("/models", response_model=list[ModelPublic])
def list_all(project: ProjectName, session: SessionDep, _: ReadDep) -> list[ModelPublic]:
    """Newest first, each with its metrics and promotion decision."""
    row = get_project(session, project)
    return [
        ModelPublic.of(model, list(row.labels), model_lineage(session, row, model.version))
        for model in list_models(session, row)
    ]


@router.get("/models/{version}", response_model=ModelPublic)
def get(project: ProjectName, version: Version, session: SessionDep, _: ReadDep) -> ModelPublic:
    row = get_project(session, project)
    model = get_model(session, row, version)
    return ModelPublic.of(model, list(row.labels), model_lineage(session, row, version))


@router.get(
    "/models/{version}/checkpoint",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}, "description": "weights + sidecar"}},
)
def checkpoint(
    project: ProjectName, version: Version, session: SessionDep, settings: SettingsDep, _: ReadDep
) -> Response:
    """The model's checkpoint as a zip: safetensors weights and the JSON sidecar (spec, labels,
    loss, temperature), loadable with `services.ml.checkpoint.load_checkpoint`."""
    row = get_project(session, project)
    model = get_model(session, row, version)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in model_files(row, model, settings).items():
            archive.writestr(name, data)
    return Response(
        buffer.getvalue(),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{row.name}-m{version}.zip"'},
    )


@router.post("/models/{version}/promote", response_model=ModelPublic)
def promote(
    project: ProjectName, version: Version, session: SessionDep, who: WriteDep
) -> ModelPublic:
    """Make this model current by hand (over the gate's rejection, or for a candidate)."""
    row = get_project(session, project)
    model = make_current(session, project, version, actor=who.actor, action="model.promote")
    return ModelPublic.of(model, list(row.labels), model_lineage(session, row, version))


@router.post("/models/{version}/rollback", response_model=ModelPublic)
def rollback(
    project: ProjectName, version: Version, session: SessionDep, who: WriteDep
) -> ModelPublic:
    """Return to an earlier model; the current one is retired."""
    row = get_project(session, project)
    model = make_current(session, project, version, actor=who.actor, action="model.rollback")
    return ModelPublic.of(model, list(row.labels), model_lineage(session, row, version))


@router.post("/predict", response_model=PredictPublic)
async def predict(
    project: ProjectName, body: PredictRequest, engine: EngineDep, settings: SettingsDep, _: ReadDep
) -> PredictPublic:
    """Score pool items (by external id) or feature rows with the current model: calibrated
    class probabilities per row, in the order given."""
    if (body.item_ids is None) == (body.features is None):
        raise InvalidInput("give exactly one of item_ids or features")

    def run() -> PredictPublic:
        with session_scope(engine) as session:
            row = get_project(session, project)
            model_row = current_model(session, row)
            if model_row is None:
                raise NotFound(f"project {project!r} has no current model yet")
            checkpoint = load_model(row, model_row, settings)
            names: list[str | None]
            if body.item_ids is not None:
                ids = dict(
                    session.execute(
                        sa.select(col(Item.external_id), col(Item.id)).where(
                            col(Item.project_id) == row.id,
                            col(Item.external_id).in_(body.item_ids),
                        )
                    ).all()
                )
                missing = [i for i in body.item_ids if i not in ids]
                if missing:
                    raise NotFound(f"no items {missing[:5]} in project {project!r}")
                inputs = load_items(session, row, [ids[i] for i in body.item_ids], settings)
                names = list(body.item_ids)
            else:
                rows = body.features or []
                if row.modality != "features":
                    raise InvalidInput("feature rows can only be scored for a features project")
                if any(len(values) != row.feature_dim for values in rows):
                    raise InvalidInput(
                        f"each feature row needs {row.feature_dim} values (the pool's width)"
                    )
                inputs = np.asarray(rows, dtype=np.float32)
                if not np.all(np.isfinite(inputs)):
                    raise InvalidInput("feature values must be finite numbers")
                names = [None] * len(inputs)
            labels = list(row.labels)
            version = model_row.version
        probs = predict_with(checkpoint, inputs, settings).probs
        return PredictPublic(
            model_version=version,
            predictions=[
                Prediction(
                    item_id=name,
                    label=labels[int(np.argmax(p))],
                    probability=float(np.max(p)),
                    probabilities={label: float(v) for label, v in zip(labels, p, strict=False)},
                )
                for name, p in zip(names, probs, strict=True)
            ],
        )

    return await run_in_threadpool(run)
