"""The whole loop on one machine, without Docker (`focalloop up`): the embedded defaults'
bootstrap (an admin token, a webhook secret) and the digits demo project. Without Redis, `up`
runs the loop with `services.cycle.runner.InProcessLoop`."""

import logging
import secrets
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import sqlalchemy as sa
from PIL import Image
from sklearn.datasets import load_digits
from sqlmodel import select

from labeling.simulated import set_simulated_labeler
from services.auth import create_token
from services.config import Settings
from services.datasets.pool import add_to_pool
from services.db import session_scope
from services.models import Project
from services.projects import ProjectSpec, create_project

log = logging.getLogger(__name__)

DEMO_PROJECT = "digits"
DEMO_IMAGE_SIZE = 32  # the 8x8 digits are upscaled so a person can read them in a browser
# ...but the model trains on them at their own 8x8: upscaled 32x32 inputs gave macro-F1 0.697 at
# 300 labels (the measurement); what people see is the item's file, whatever this is.
DEMO_TRAIN_SIZE = 8


def write_secret_file(path: Path, secret: str) -> None:
    """Write a secret readable by this user only (0600), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(secret + "\n")


def ensure_webhook_secret(path: Path) -> str:
    """The local stack's webhook secret: made once, kept in `path` for later runs."""
    if path.is_file():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(32)
    write_secret_file(path, secret)
    return secret


def ensure_admin_token(engine: sa.Engine, path: Path) -> bool:
    """An admin API token for the person who ran `up`, written to `path` (0600) on the first
    run. Returns True when it was created now."""
    if path.is_file():
        return False
    with session_scope(engine) as session:
        _, secret = create_token(session, name="focalloop up", scope="admin", actor="cli:up")
    write_secret_file(path, secret)
    return True


def write_demo_images(folder: Path) -> tuple[Path, pa.Table]:
    """scikit-learn's 1,797 handwritten digits as PNG files (upscaled to 32x32) and a manifest
    (item_id, uri). Returns the manifest's path and the true labels (item_id, label)."""
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    ids, uris = [], []
    for index, image in enumerate(digits.images):
        item_id = f"digit-{index:04d}"
        pixels = (np.asarray(image) * (255.0 / 16.0)).round().astype(np.uint8)
        path = folder / f"{item_id}.png"
        if not path.exists():
            Image.fromarray(pixels, mode="L").resize(
                (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE), Image.Resampling.NEAREST
            ).save(path)
        ids.append(item_id)
        uris.append(f"file://{path}")
    manifest = folder / "manifest.csv"
    pacsv.write_csv(pa.table({"item_id": ids, "uri": uris}), manifest)
    truth = pa.table({"item_id": ids, "label": [str(int(y)) for y in digits.target]})
    return manifest, truth


def ensure_demo_project(
    engine: sa.Engine, settings: Settings, sources: Path, *, simulated: bool
) -> bool:
    """The digits project (ten classes "0".."9", images) with its pool, created once. With
    `simulated`, a simulated annotator answers from the true labels (no person needed); else the
    project waits for a labeling tool. Returns True when it was created now."""
    with session_scope(engine) as session:
        exists = session.exec(select(Project.id).where(Project.name == DEMO_PROJECT)).first()
    if exists is not None:
        return False
    manifest, truth = write_demo_images(sources / DEMO_PROJECT)
    store = settings.data_dir.expanduser().resolve() / "stores" / DEMO_PROJECT
    with session_scope(engine) as session:
        project = create_project(
            session,
            ProjectSpec(
                name=DEMO_PROJECT,
                labels=[str(digit) for digit in range(10)],
                modality="image",
                store_url=f"file://{store}",
                image_size=DEMO_TRAIN_SIZE,
                image_channels=1,
                batch_size=20,
                retrain_min_new_labels=20,
            ),
        )
        add_to_pool(
            session,
            project,
            str(manifest),
            settings=settings,
            trusted_roots=[f"file://{sources}"],
        )
        if simulated:
            set_simulated_labeler(session, DEMO_PROJECT, truth, settings, annotator="sim")
    return True
