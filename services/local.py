"""The whole loop on one machine, without Docker (`focalloop up`): the embedded defaults'
bootstrap (schema, an admin token, a webhook secret), the digits demo project, and the
in-process runner used when no Redis is at hand.

The in-process runner drives the same service functions the Celery tasks call, in the order the
tasks chain them, so a cycle run here leaves exactly the rows a distributed one would.
"""

import logging
import secrets
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import sqlalchemy as sa
from PIL import Image
from sklearn.datasets import load_digits
from sqlmodel import col, select

from services import cycles, labelstudio
from services.auth import create_token
from services.config import Settings
from services.datasets.pool import add_to_pool
from services.db import session_scope
from services.models import Cycle, CycleState, Project
from services.projects import ProjectSpec, create_project

log = logging.getLogger(__name__)

DEMO_PROJECT = "digits"
DEMO_IMAGE_SIZE = 32  # the 8x8 digits are upscaled so a person can read them in a browser


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
                image_size=DEMO_IMAGE_SIZE,
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
            cycles.set_simulated_labeler(session, DEMO_PROJECT, truth, settings, annotator="sim")
    return True


def run_cycle_in_process(engine: sa.Engine, cycle_id: int, settings: Settings) -> None:
    """train -> every chunk -> select -> hand off -> ingest, as the Celery tasks chain them."""
    outcome = cycles.train_cycle(engine, cycle_id, settings)
    select_next = outcome.select
    for chunk_id in outcome.chunk_ids:
        chunk = cycles.score_chunk(engine, chunk_id, settings, worker="in-process")
        select_next = chunk.select or select_next
    if select_next and cycles.select_cycle(engine, cycle_id, settings):
        cycles.ingest_events(engine, cycles.hand_off(engine, cycle_id, settings))


class InProcessLoop(threading.Thread):
    """Beat and one worker in a thread: every `schedule_interval_s` it starts the cycles that
    are due and runs every pending one (those the API started too), ingests stored labeling
    events, and reconciles Label Studio projects on their own interval."""

    def __init__(self, engine: sa.Engine, settings: Settings) -> None:
        super().__init__(name="focalloop-in-process-loop", daemon=True)
        self.engine = engine
        self.settings = settings
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        since_sync = self.settings.label_studio_sync_interval_s  # reconcile on the first pass
        while not self.stopping.is_set():
            try:
                self.step(sync=since_sync >= self.settings.label_studio_sync_interval_s)
            except Exception:
                # One failed pass (a store or Label Studio unreachable) must not end the loop.
                log.exception("in-process loop pass failed; trying again")
            if since_sync >= self.settings.label_studio_sync_interval_s:
                since_sync = 0.0
            since_sync += self.settings.schedule_interval_s
            self.stopping.wait(self.settings.schedule_interval_s)

    def step(self, *, sync: bool) -> None:
        cycles.start_due_cycles(self.engine, self.settings)
        with session_scope(self.engine) as session:
            pending = list(
                session.exec(
                    select(Cycle.id)
                    .where(Cycle.state == CycleState.PENDING)
                    .order_by(col(Cycle.id))
                ).all()
            )
        for cycle_id in pending:
            if self.stopping.is_set():
                return
            run_cycle_in_process(self.engine, cycle_id or 0, self.settings)
        self.recover()
        if sync:
            labelstudio.reconcile_all(self.engine, self.settings)

    def recover(self) -> None:
        """Finish what an earlier pass left half done (a stage that raised, e.g. SQLite busy
        while the API wrote): beat's `recover_stalled` decides, and the stages run here
        instead of being enqueued. Every stage is idempotent, as for redelivered messages."""
        recovery = cycles.recover_stalled(self.engine, self.settings)
        for cycle_id in recovery.train_cycle_ids:
            run_cycle_in_process(self.engine, cycle_id, self.settings)
        for chunk_id in recovery.chunk_ids:
            outcome = cycles.score_chunk(self.engine, chunk_id, self.settings, worker="in-process")
            if outcome.select and outcome.cycle_id is not None:
                recovery.select_cycle_ids.append(outcome.cycle_id)
        for cycle_id in recovery.select_cycle_ids:
            if cycles.select_cycle(self.engine, cycle_id, self.settings):
                recovery.hand_off_cycle_ids.append(cycle_id)
        for cycle_id in recovery.hand_off_cycle_ids:
            cycles.hand_off(self.engine, cycle_id, self.settings)
        # No message is ever in flight here, so every unprocessed event is this loop's to ingest
        # (simulated answers and Label Studio webhooks alike).
        with session_scope(self.engine) as session:
            waiting = cycles.pending_events(session)
        if waiting:
            cycles.ingest_events(self.engine, waiting)
