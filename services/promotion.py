"""Which model is current: the cycle's gate decides for new models (`services.gate`); people
promote or roll back by hand here, audited."""

from sqlmodel import Session, col, select

from services.audit import record
from services.errors import Conflict, InvalidInput, NotFound
from services.gate import gate_config
from services.models import ModelVersion, Project, Promotion, utcnow
from services.projects import get_project


def current_model(session: Session, project: Project) -> ModelVersion | None:
    """The model that scores the pool now (None before the first promotion)."""
    return session.exec(
        select(ModelVersion).where(
            ModelVersion.project_id == project.id, ModelVersion.promotion == Promotion.CURRENT
        )
    ).first()


def newest_model(session: Session, project: Project) -> ModelVersion | None:
    """The most recently trained model, whatever the gate decided about it."""
    return session.exec(
        select(ModelVersion)
        .where(ModelVersion.project_id == project.id)
        .order_by(col(ModelVersion.version).desc())
        .limit(1)  # first() alone loads every model's metrics before taking one
    ).first()


def _model(session: Session, project: Project, version: int) -> ModelVersion:
    model = session.exec(
        select(ModelVersion)
        .where(ModelVersion.project_id == project.id, ModelVersion.version == version)
        .with_for_update()
    ).first()
    if model is None:
        raise NotFound(f"project {project.name!r} has no model version {version}")
    return model


def make_current(
    session: Session, project_name: str, version: int, *, actor: str, action: str
) -> ModelVersion:
    """Make model `version` current by hand: `model.promote` (override a rejection or promote
    a candidate) or `model.rollback` (return to an earlier model). The replaced model is
    retired; both decisions are written to the audit log with the actor."""
    if action not in ("model.promote", "model.rollback"):
        raise InvalidInput(f"unknown model action {action!r}")
    project = get_project(session, project_name, for_update=True)
    model = _model(session, project, version)
    current = current_model(session, project)
    if current is not None and current.version == version:
        raise Conflict(f"model m{version} of {project.name!r} is already current")
    if action == "model.rollback" and current is not None and version > current.version:
        raise InvalidInput(
            f"rollback goes to an earlier model; m{version} is newer than the current "
            f"m{current.version} (use promote)"
        )
    replaced = current.version if current is not None else None
    if current is not None:
        current.promotion = Promotion.RETIRED
        current.promotion_reason = (
            f"retired by {action.split('.')[1]} to m{version} ({actor}); was: "
            f"{current.promotion_reason or ''}"
        )[:2000]
        session.add(current)
        session.flush()  # the partial rule "one current" must see it retired first
    verb = "promoted" if action == "model.promote" else "rolled back"
    model.promotion = Promotion.CURRENT
    model.promotion_reason = (
        f"{verb} by {actor}"
        + (f" (replacing m{replaced})" if replaced is not None else "")
        + f"; gate said: {model.promotion_reason or 'nothing'}"
    )[:2000]
    model.promoted_at = utcnow()
    session.add(model)
    session.flush()
    record(
        session,
        actor=actor,
        action=action,
        project_id=project.id,
        target=f"model:m{version}",
        detail={"replaced": replaced},
    )
    return model


def rejections_in_a_row(session: Session, project: Project) -> int:
    """How many of the newest models the gate rejected, counted back to the last one it did
    not reject."""
    count = 0
    for promotion in session.exec(
        select(ModelVersion.promotion)
        .where(ModelVersion.project_id == project.id)
        .order_by(col(ModelVersion.version).desc())
        .limit(1000)
    ):
        if promotion != Promotion.REJECTED:
            break
        count += 1
    return count


def gate_alert(session: Session, project: Project) -> str | None:
    """A warning when the gate rejected the project's newest `alert_after_rejections` models or
    more: the current model is getting old while labels keep arriving (None otherwise)."""
    count = rejections_in_a_row(session, project)
    if count < gate_config(project).alert_after_rejections:
        return None
    current = current_model(session, project)
    serving = f"m{current.version}" if current is not None else "no model"
    return (
        f"project {project.name!r}: the gate rejected the last {count} models in a row; "
        f"{serving} still scores the pool (see `focalloop model list {project.name}`)"
    )
