"""One simulated run's deployment: the product itself, embedded. A SQLite database migrated like
any other, a local store, a project whose settings are the arm's, the seed's pool registered
through the ordinary pool source (an .npz, initial labels as seed labels) and the simulated
labeler answering from the truth. Everything lives in a folder the run owns.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import sqlalchemy as sa
from numpy.typing import NDArray

from labeling.simulated import set_simulated_labeler
from services import db
from services.config import Settings
from services.datasets.pool import add_to_pool
from services.errors import InvalidInput
from services.projects import ProjectSpec, create_project

PROJECT = "simulation"


@dataclass(frozen=True)
class Deployment:
    """An embedded deployment running one project. labels: the class names ("0".."C-1")."""

    settings: Settings
    engine: sa.Engine
    project: str
    labels: list[str]


@dataclass(frozen=True)
class ProjectSettings:
    """The arm's and the seed's project settings."""

    loss: dict[str, Any]
    selection: dict[str, Any]
    batch_size: int
    label_budget: int | None
    seed: int
    noise: float


def embedded_settings(base: Settings, folder: Path) -> Settings:
    """`base` (the caller's device and threads) pointed at `folder`: its own SQLite file and
    store, no broker, sources read only from the folder."""
    return base.model_copy(
        update={
            "data_dir": folder,
            "database_url": f"sqlite:///{folder / 'state.db'}",
            "source_roots": [f"file://{folder}"],
            "store_roots": [],
            "broker_url": "memory://",
        }
    )


def deploy(
    folder: Path,
    base: Settings,
    *,
    items: NDArray[np.float32],
    labels: NDArray[np.int64],
    n_classes: int,
    seeded: NDArray[np.int64],
    project: ProjectSettings,
) -> Deployment:
    """A deployment in `folder` whose project's pool is `items` [n, d] (features) or [n, H, W] /
    [n, C, H, W] (images in [0, 1]) with true labels [n]; the items at positions `seeded` come
    labeled (seed labels), the simulated labeler answers for the rest. Item i is "i000000"+i."""
    settings = embedded_settings(base, folder)
    engine = db.make_engine(settings.resolved_database_url())
    db.upgrade(engine)
    names = [str(c) for c in range(n_classes)]
    item_ids = np.array([f"i{i:06d}" for i in range(len(items))])
    given = np.full(len(items), "", dtype=object)
    given[seeded] = [names[int(label)] for label in labels[seeded]]
    image = items.ndim > 2
    source = folder / "pool.npz"
    arrays: dict[str, NDArray[Any]] = {
        "images" if image else "features": items,
        "item_ids": item_ids,
        "labels": given.astype(str),
    }
    np.savez(source, **arrays)  # type: ignore[arg-type]
    with db.session_scope(engine) as session:
        created = create_project(
            session,
            ProjectSpec(
                name=PROJECT,
                labels=names,
                modality="image" if image else "features",
                store_url=f"file://{folder / 'store'}",
                image_size=int(items.shape[-1]) if image else 32,
                image_channels=int(items.shape[1]) if items.ndim == 4 else 1,
                loss=project.loss,
                selection=project.selection,
                batch_size=project.batch_size,
                label_budget=project.label_budget,
                retrain_min_new_labels=1,  # each answered batch starts the next cycle
                seed=project.seed,
            ),
        )
        report = add_to_pool(
            session, created, str(source), settings=settings, trusted_roots=[f"file://{folder}"]
        )
        if report.duplicates or report.unreadable:
            # The product keeps one item per content and skips what it cannot read; the split
            # and the initial labels would then no longer be the seed's.
            raise InvalidInput(
                f"the data holds {report.duplicates} repeated and {report.unreadable} unusable "
                "(non-finite) rows in a seed's pool; remove them before simulating"
            )
        set_simulated_labeler(
            session,
            PROJECT,
            pa.table({"item_id": item_ids, "label": [names[int(y)] for y in labels]}),
            settings,
            annotator="simulated",
            noise=project.noise,
        )
    return Deployment(settings=settings, engine=engine, project=PROJECT, labels=names)
