"""`focalloop bench push`: tasks/s creating `tasks` labeling tasks (features rows with a
prediction each) in a real Label Studio through `labeling.label_studio.tasks.push_pending`
(payloads built from the pool, batches confirmed in the database), against the SDK's bare
`projects.import_tasks` of the same payloads in the same batch size into a fresh project of the
same label config. Alternating order, a new project per run, median of `repeats`. Also the
helpers both Label Studio benchmarks share (`bench ingest` is in `services.bench.ingest`).
"""

import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from pydantic import SecretStr
from sqlmodel import col, select

from labeling.label_studio.gateway import LabelStudioGateway
from labeling.label_studio.link import connect
from labeling.label_studio.payloads import label_config
from labeling.label_studio.server import LocalLabelStudio, default_cache_dir, ensure_installed
from labeling.label_studio.tasks import pending_tasks, push_pending, task_payloads
from services import db
from services.config import Settings, provide_secret
from services.datasets.pool import add_to_pool
from services.models import Item, ItemStatus, LabelTask, LabelTaskState
from services.projects import ProjectSpec, create_project, get_project
from services.servers import free_port

TOKEN_ENV = "FOCALLOOP_BENCH_LABEL_STUDIO_TOKEN"
LABELS = ["common", "rare"]
SECRET = "bench-webhook-secret"


def features_project(
    engine: sa.Engine, settings: Settings, folder: Path, n_items: int, dim: int = 16
) -> str:
    """A features project with `n_items` random rows; every item selected (as a cycle leaves
    them before hand-off)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez(
        folder / "pool.npz",
        features=rng.normal(size=(n_items, dim)).astype(np.float32),
        item_ids=np.array([f"i{i:07d}" for i in range(n_items)]),
    )
    name = f"bench-{uuid.uuid4().hex[:10]}"
    with db.session_scope(engine) as session:
        project = create_project(
            session,
            ProjectSpec(
                name=name, labels=LABELS, modality="features", store_url=f"file://{folder}/store"
            ),
        )
        add_to_pool(
            session,
            project,
            str(folder / "pool.npz"),
            settings=settings,
            trusted_roots=[f"file://{folder}"],
        )
        session.execute(
            sa.update(Item)
            .where(col(Item.project_id) == project.id)
            .values(status=ItemStatus.SELECTED)
        )
    return name


def plan_tasks(engine: sa.Engine, name: str, state: LabelTaskState) -> list[int]:
    """One label task per item (pending, with a prediction; or open with fake task ids)."""
    rng = np.random.default_rng(1)
    with db.session_scope(engine) as session:
        project = get_project(session, name)
        item_ids = list(
            session.exec(
                select(Item.id).where(Item.project_id == project.id).order_by(col(Item.id))
            ).all()
        )
        rows = [
            {
                "project_id": project.id,
                "item_id": item_id,
                "kind": "label",
                "state": state,
                "external_task_id": position + 1 if state == LabelTaskState.OPEN else None,
                "model_version": f"{name}-m1",
                "prediction_label": LABELS[int(rng.integers(2))],
                "prediction_score": float(rng.uniform(0.5, 1.0)),
                "note": "",
                "created_at": datetime.now(UTC),
                "updated_at": datetime.now(UTC),
            }
            for position, item_id in enumerate(item_ids)
        ]
        session.execute(sa.insert(LabelTask), rows)
        if state == LabelTaskState.OPEN:
            session.execute(
                sa.update(Item)
                .where(col(Item.project_id) == project.id)
                .values(status=ItemStatus.QUEUED)
            )
    return [int(i or 0) for i in item_ids]


# ------------------------------------------------------------------------------------- push


@dataclass(frozen=True)
class PushBenchResult:
    tasks: int
    batch: int
    repeats: int
    ours_s: float
    sdk_s: float
    ours_tasks_per_s: float
    sdk_tasks_per_s: float
    ours_vs_sdk_ratio: float  # throughput ratio: ours / bare SDK import (1.0 = no overhead)
    ours_runs_s: list[float]
    sdk_runs_s: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def _label_studio(folder: Path) -> Iterator[LocalLabelStudio]:
    server = LocalLabelStudio(
        ensure_installed(default_cache_dir()), port=free_port(), data_dir=folder / "ls"
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def run_push_bench(*, tasks: int, repeats: int, batch: int) -> PushBenchResult:
    ours_runs: list[float] = []
    sdk_runs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="focalloop-bench-push-") as tmp:
        folder = Path(tmp)
        with _label_studio(folder) as server:
            # The gateway reads the token from the variable a project's link names.
            provide_secret(TOKEN_ENV, server.credentials.token)
            settings = Settings(
                data_dir=folder / "data",
                webhook_secret=SecretStr(SECRET),
                label_studio_import_batch=batch,
                api_url="http://127.0.0.1:9",  # no webhook fires: nothing is annotated
            )
            engine = db.make_engine(f"sqlite:///{folder / 'state.db'}")
            db.upgrade(engine)
            remote = LabelStudioGateway(server.url, server.credentials.token)
            for repeat in range(repeats):
                name = features_project(engine, settings, folder / f"p{repeat}", tasks)
                with db.session_scope(engine) as session:
                    connect(session, name, url=server.url, token_env=TOKEN_ENV, settings=settings)
                plan_tasks(engine, name, LabelTaskState.PENDING)
                with db.session_scope(engine) as session:
                    project = get_project(session, name)
                    pending = pending_tasks(session, project.id or 0)
                    payloads = task_payloads(session, project, pending, settings)
                bare_project = remote.create_project(
                    title=f"bare {repeat}",
                    label_config=label_config(LABELS, "features"),
                    description="",
                )

                def ours(name: str = name) -> float:
                    start = time.perf_counter()
                    report = push_pending(engine, name, settings)
                    elapsed = time.perf_counter() - start
                    assert report.created == tasks, report
                    return elapsed

                def bare(project_id: int = bare_project, payloads: list[Any] = payloads) -> float:
                    start = time.perf_counter()
                    created = 0
                    for offset in range(0, len(payloads), batch):
                        created += len(
                            remote.import_tasks(project_id, payloads[offset : offset + batch])
                        )
                    elapsed = time.perf_counter() - start
                    assert created == tasks
                    return elapsed

                if repeat % 2 == 0:
                    ours_runs.append(ours())
                    sdk_runs.append(bare())
                else:
                    sdk_runs.append(bare())
                    ours_runs.append(ours())
            engine.dispose()
    ours_s = statistics.median(ours_runs)
    sdk_s = statistics.median(sdk_runs)
    return PushBenchResult(
        tasks=tasks,
        batch=batch,
        repeats=repeats,
        ours_s=ours_s,
        sdk_s=sdk_s,
        ours_tasks_per_s=tasks / ours_s,
        sdk_tasks_per_s=tasks / sdk_s,
        ours_vs_sdk_ratio=sdk_s / ours_s,
        ours_runs_s=ours_runs,
        sdk_runs_s=sdk_runs,
    )
