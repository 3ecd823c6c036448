"""Projects: creation, lookup by name, settings, and the label set's add-only rule."""

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from services.config import Settings
from services.cron import retrain_crontab
from services.datasets.store import StoreUrl
from services.db import lock_for_write
from services.errors import Conflict, InvalidInput, NotFound
from services.gate import GateConfig
from services.ml.train import LossSpec
from services.models import MAX_INT32, Item, ItemStatus, Project, utcnow
from services.recipe import default_recipe
from services.selection.config import SelectionConfig

# Lowercase letters, digits and hyphens, 3-40 characters (Label Studio wants >= 3), starting
# and ending with a letter or digit so the name is also a safe store key segment.
_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{1,38}[a-z0-9]")
_LABEL = re.compile(r"[^\x00-\x1f,]{1,200}")
Modality = Literal["features", "image"]


def check_project_name(name: str) -> str:
    if not _SLUG.fullmatch(name):
        raise InvalidInput(
            f"invalid project name {name!r}: use 3-40 lowercase letters, digits and hyphens, "
            "starting and ending with a letter or digit"
        )
    return name


def check_labels(labels: Sequence[str]) -> list[str]:
    """A label set: at least two distinct class names, no commas or control characters,
    no surrounding spaces, at most 200 characters each."""
    cleaned = list(labels)
    if len(cleaned) < 2:
        raise InvalidInput(f"a label set needs at least two classes, got {cleaned}")
    for label in cleaned:
        if label != label.strip() or not _LABEL.fullmatch(label):
            raise InvalidInput(
                f"invalid class name {label!r}: 1-200 characters, no commas, control "
                "characters or surrounding spaces"
            )
    repeated = sorted({label for label in cleaned if cleaned.count(label) > 1})
    if repeated:
        raise InvalidInput(f"class names repeat in the label set: {repeated}")
    return cleaned


def check_cron(expression: str) -> str:
    """A five-field cron expression (minute hour day-of-month month day-of-week) that beat can
    evaluate, normalized to single spaces."""
    retrain_crontab(expression)
    return " ".join(expression.split())


@dataclass(frozen=True)
class ProjectSpec:
    """Everything a new project is created with (the CLI's and the API's input)."""

    name: str
    labels: Sequence[str]
    modality: Modality
    store_url: str
    image_size: int = 32
    image_channels: int = 1
    loss: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    batch_size: int = 50
    label_budget: int | None = None
    retrain_min_new_labels: int = 100
    retrain_cron: str | None = None
    refill_below: int | None = None  # None: one batch
    gate: dict[str, Any] | None = None
    seed: int = 0


MAX_BATCH = 100_000
# Settings that may be unset (None means: no budget, no cron); the others always have a value.
CLEARABLE = frozenset({"label_budget", "retrain_cron"})


def check_count(name: str, value: int, *, high: int = MAX_INT32) -> int:
    """A whole-number setting in [1, high]; InvalidInput naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise InvalidInput(f"{name} must be a whole number in [1, {high}], got {value!r}")
    return value


def check_refill_below(value: int) -> int:
    """Open tasks under which the next cycle starts (0: only labels and cron start cycles)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BATCH:
        raise InvalidInput(
            f"refill_below must be a whole number in [0, {MAX_BATCH}], got {value!r}"
        )
    return value


def check_seed(seed: int) -> int:
    """A project seed: every random choice of its cycles derives from it."""
    if not 0 <= seed <= MAX_INT32:
        raise InvalidInput(f"seed must be in [0, {MAX_INT32}], got {seed}")
    return seed


def _checked_gate(gate: dict[str, Any] | None, labels: list[str]) -> dict[str, Any]:
    return GateConfig.from_dict(dict(gate or {}), labels).to_dict()


def _checked_loss(loss: dict[str, Any] | None, n_classes: int) -> dict[str, Any]:
    try:
        spec = default_recipe().loss if loss is None else LossSpec.from_dict(loss)
        # Building the loss runs its own checks (gamma >= 0, alpha length, scheme names).
        spec.build([1] * n_classes)
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"invalid loss settings: {error}") from None
    return spec.to_dict()


def create_project(session: Session, spec: ProjectSpec) -> Project:
    """Create a project; Conflict when the name is taken, InvalidInput for bad settings."""
    check_project_name(spec.name)
    labels = check_labels(spec.labels)
    if spec.modality not in ("features", "image"):
        raise InvalidInput(f"modality must be features or image, got {spec.modality!r}")
    store_url = str(StoreUrl.parse(spec.store_url))
    if spec.modality == "image":
        if not 8 <= spec.image_size <= 1024:
            raise InvalidInput(f"image_size must be in [8, 1024] pixels, got {spec.image_size}")
        if spec.image_channels not in (1, 3):
            raise InvalidInput(f"image_channels must be 1 or 3, got {spec.image_channels}")
    check_count("batch_size", spec.batch_size, high=MAX_BATCH)
    if spec.label_budget is not None:
        check_count("label_budget", spec.label_budget)
    check_count("retrain_min_new_labels", spec.retrain_min_new_labels)
    selection = SelectionConfig.from_dict(spec.selection or {}).to_dict()
    if session.exec(select(Project.id).where(Project.name == spec.name)).first() is not None:
        raise Conflict(f"project {spec.name!r} already exists")
    project = Project(
        name=spec.name,
        labels=labels,
        modality=spec.modality,
        store_url=store_url,
        image_size=spec.image_size if spec.modality == "image" else None,
        image_channels=spec.image_channels if spec.modality == "image" else None,
        loss_config=_checked_loss(spec.loss, len(labels)),
        selection_config=selection,
        batch_size=spec.batch_size,
        label_budget=spec.label_budget,
        retrain_min_new_labels=spec.retrain_min_new_labels,
        retrain_cron=check_cron(spec.retrain_cron) if spec.retrain_cron else None,
        refill_below=check_refill_below(
            spec.batch_size if spec.refill_below is None else spec.refill_below
        ),
        gate=_checked_gate(spec.gate, labels),
        seed=check_seed(spec.seed),
    )
    session.add(project)
    try:
        session.flush()
    except sa.exc.IntegrityError:
        # Another writer took the name between our check and our insert.
        raise Conflict(f"project {spec.name!r} already exists") from None
    return project


def api_store_url(settings: Settings, name: str, given: str | None) -> str:
    """The dataset store of a project created through the API: `given` when it lies under one
    of the configured store roots, else refused; None = a folder of its own under the data dir.
    (The CLI's user names any store they can write; a remote caller may not.)"""
    if given is None:
        folder = settings.data_dir.expanduser().resolve() / "stores" / check_project_name(name)
        return f"file://{folder}"
    url = str(StoreUrl.parse(given))
    for root in settings.store_roots:
        prefix = str(StoreUrl.parse(root)).rstrip("/") + "/"
        if (url.rstrip("/") + "/").startswith(prefix) and ".." not in url.split("/"):
            return url
    raise InvalidInput(
        f"store {given!r} is outside the allowed store roots {settings.store_roots}; add its "
        "prefix to FOCALLOOP_STORE_ROOTS or leave store_url out for the default"
    )


def get_project(session: Session, name: str, *, for_update: bool = False) -> Project:
    """The project named `name`. for_update: read it under the write lock (row lock on
    PostgreSQL, the database's on SQLite) and refresh a copy the session already holds, so a
    change made from it cannot overwrite one committed meanwhile."""
    statement = select(Project).where(Project.name == name)
    if for_update:
        lock_for_write(session)
        statement = statement.with_for_update().execution_options(populate_existing=True)
    project = session.exec(statement).first()
    if project is None:
        raise NotFound(f"no project named {name!r}")
    return project


def list_projects(session: Session) -> list[Project]:
    return list(session.exec(select(Project).order_by(col(Project.name))).all())


def extend_labels(session: Session, name: str, labels: Sequence[str]) -> Project:
    """Set a project's label set to `labels`, which must be the current set with new classes
    appended: removing, renaming or reordering a class would silently change what stored labels
    and trained models mean, so it is refused."""
    project = get_project(session, name, for_update=True)
    new = check_labels(labels)
    old = list(project.labels)
    missing = [label for label in old if label not in new]
    if missing:
        raise InvalidInput(
            f"cannot remove or rename class(es) {missing} of project {name!r}: stored labels "
            "and trained models refer to them; only adding classes is allowed"
        )
    if new[: len(old)] != old:
        raise InvalidInput(
            f"cannot reorder the classes of project {name!r}: keep {old} first and append "
            "new classes after them"
        )
    if new != old:
        project.labels = new
        project.updated_at = utcnow()
        session.add(project)
        session.flush()
    return project


def set_paused(session: Session, name: str, *, paused: bool) -> Project:
    project = get_project(session, name, for_update=True)
    project.paused = paused
    project.updated_at = utcnow()
    session.add(project)
    session.flush()
    return project


@dataclass(frozen=True)
class PoolCounts:
    """Items of a project by status, plus items whose live annotations disagree."""

    by_status: dict[str, int]
    disagreements: int

    @property
    def total(self) -> int:
        return sum(self.by_status.values())


def pool_counts(session: Session, project: Project) -> PoolCounts:
    rows = session.exec(
        select(Item.status, func.count())
        .where(Item.project_id == project.id)
        .group_by(col(Item.status))
    ).all()
    by_status = {status.value: 0 for status in ItemStatus}
    by_status.update({status: count for status, count in rows})
    disagreements = session.exec(
        select(func.count())
        .select_from(Item)
        .where(Item.project_id == project.id, col(Item.disagreement).is_(True))
    ).one()
    return PoolCounts(by_status=by_status, disagreements=int(disagreements))


def update_project(
    session: Session,
    name: str,
    *,
    labels: Sequence[str] | None = None,
    batch_size: int | None = None,
    label_budget: int | None = None,
    retrain_min_new_labels: int | None = None,
    retrain_cron: str | None = None,
    refill_below: int | None = None,
    loss: dict[str, Any] | None = None,
    selection: dict[str, Any] | None = None,
    gate: dict[str, Any] | None = None,
    seed: int | None = None,
    clear: Collection[str] = (),
) -> Project:
    """Change a project's settings; arguments left None stay as they are, and the CLEARABLE
    settings named in `clear` are unset. The label set may only grow (see `extend_labels`).
    `loss`, `selection` and `gate` are merged into the current settings (keys given replace
    those keys) and checked as a whole."""
    unknown = set(clear) - CLEARABLE
    if unknown:
        raise InvalidInput(f"only {sorted(CLEARABLE)} can be unset, not {sorted(unknown)}")
    if ("label_budget" in clear and label_budget is not None) or (
        "retrain_cron" in clear and retrain_cron is not None
    ):
        raise InvalidInput("a setting cannot be both given and unset")
    if labels is not None:
        extend_labels(session, name, labels)
    project = get_project(session, name, for_update=True)
    if batch_size is not None:
        project.batch_size = check_count("batch_size", batch_size, high=MAX_BATCH)
    if label_budget is not None:
        project.label_budget = check_count("label_budget", label_budget)
    if retrain_min_new_labels is not None:
        project.retrain_min_new_labels = check_count(
            "retrain_min_new_labels", retrain_min_new_labels
        )
    if retrain_cron is not None:
        project.retrain_cron = check_cron(retrain_cron)
    if refill_below is not None:
        project.refill_below = check_refill_below(refill_below)
    if "label_budget" in clear:
        project.label_budget = None
    if "retrain_cron" in clear:
        project.retrain_cron = None
    if loss is not None:
        project.loss_config = _checked_loss({**project.loss_config, **loss}, len(project.labels))
    if selection is not None:
        project.selection_config = SelectionConfig.from_dict(
            {**project.selection_config, **selection}
        ).to_dict()
    if gate is not None:
        project.gate = _checked_gate({**project.gate, **gate}, list(project.labels))
    if seed is not None:
        project.seed = check_seed(seed)
    project.updated_at = utcnow()
    session.add(project)
    session.flush()
    return project
