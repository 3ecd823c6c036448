"""`focalloop bench console`: the server time of the console's pages and data endpoints on a
large project: a pool of ITEMS items (most unlabeled), MODELS model versions with full metrics,
CYCLES cycles, on a PostgreSQL database of its own (created and dropped here) or SQLite.

Rows are written straight into the tables (COPY on PostgreSQL): the benchmark measures reading
them, and a real loop would take days to produce a history this long. The requests go through
the app in-process (Starlette's TestClient), so the time is the server's (routing, queries,
rendering) without a network, with the startup objects frozen out of garbage collection as
`focalloop api` does. Baseline in the same run: the REST API's GET of the project.
"""

import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import sqlalchemy as sa
from fastapi.testclient import TestClient
from psycopg import sql
from sqlmodel import col

from services import db
from services.api.app import create_app, freeze_startup_objects
from services.auth import create_token
from services.config import Settings
from services.curve import curve_summary
from services.ml.metrics import evaluate
from services.models import (
    Annotation,
    Cycle,
    CycleState,
    DatasetVersion,
    DatasetVersionState,
    InboxEvent,
    LabelTask,
    ModelVersion,
    Project,
    Promotion,
    utcnow,
)

ADMIN_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
LABELS = [f"class-{c}" for c in range(10)]
LABELED, QUEUED, UNREADABLE, REFUSED, EVALUATION = 10_000, 500, 100, 50, 300
SAME_ORIGIN = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}


@dataclass(frozen=True)
class EndpointTime:
    """Median and worst server time of one GET over the repeats, milliseconds."""

    path: str
    median_ms: float
    max_ms: float
    bytes: int


@contextmanager
def _database(kind: str, folder: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'state.db'}"
        return
    name = f"focalloop_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_PG_URL, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield ADMIN_PG_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(ADMIN_PG_URL, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _status(i: int) -> tuple[str, str | None, str | None, bool]:
    """(status, status_reason, label_issue, eval_set) of item i: labeled first, then queued,
    unreadable, the rest unlabeled, the first REFUSED of them with a refused answer."""
    if i < LABELED:
        return "labeled", None, None, i < EVALUATION
    if i < LABELED + QUEUED:
        return "queued", None, None, False
    if i < LABELED + QUEUED + UNREADABLE:
        return "unreadable", f"cannot identify image file item-{i:07d}.png", None, False
    refused = i < LABELED + QUEUED + UNREADABLE + REFUSED
    return "unlabeled", None, "label 'cat' is not in the label set" if refused else None, False


def _items(engine: sa.Engine, project_id: int, n: int) -> None:
    now = utcnow()
    columns = (
        "project_id, external_id, uri, content_hash, status, status_reason, label, "
        "label_source, annotator, n_annotators, disagreement, registered_from, label_issue, "
        "eval_set, created_at, updated_at"
    )
    rows = (
        (
            project_id,
            f"item-{i:07d}",
            f"file:///pool/item-{i:07d}.png",
            f"{i:064x}",
            status,
            reason,
            LABELS[i % len(LABELS)] if status == "labeled" else None,
            "simulated" if status == "labeled" else None,
            "sim" if status == "labeled" else None,
            1 if status == "labeled" else 0,
            False,
            "file:///pool",
            issue,
            evaluation,
            now,
            now,
        )
        for i in range(n)
        for status, reason, issue, evaluation in [_status(i)]
    )
    if engine.dialect.name == "postgresql":
        raw = engine.raw_connection()
        try:
            connection = raw.driver_connection
            assert isinstance(connection, psycopg.Connection)
            with (
                connection.cursor() as cursor,
                cursor.copy(f"COPY item ({columns}) FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(row)
            raw.commit()
        finally:
            raw.close()
        return
    names = [c.strip() for c in columns.split(",")]
    insert = sa.text(f"INSERT INTO item ({columns}) VALUES ({', '.join(':' + c for c in names)})")
    with engine.begin() as connection:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(dict(zip(names, row, strict=True)))
            if len(batch) == 50_000:
                connection.execute(insert, batch)
                batch = []
        if batch:
            connection.execute(insert, batch)


def _metrics(rng: np.random.Generator, version: int) -> dict[str, Any]:
    """A model's stored metrics, shaped as the cycle writes them (evaluation on 300 items)."""
    n = len(LABELS)
    targets = rng.integers(0, n, size=300)
    logits = rng.normal(size=(300, n)) + np.eye(n)[targets] * (1 + version / 50)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    report = evaluate(probs, targets).to_dict()
    epochs = 100
    return {
        "labels": LABELS,
        "train_loss": np.linspace(2, 0.1, epochs).tolist(),
        "val_loss": np.linspace(2, 0.3, epochs).tolist(),
        "val_error": np.linspace(0.9, 0.1, epochs).tolist(),
        "best_epoch": epochs - 10,
        "temperature": 1.3,
        "ece_before": 0.08,
        "ece_after": 0.03,
        "class_counts": {label: 40 + version for label in LABELS},
        "trained_items": 50 * version,
        "validation_items": 0,
        "validation": None,
        "evaluation": report,
        "evaluation_of_current": report,
        "evaluation_labels": {label: 30 for label in LABELS},
    }


def seed(engine: sa.Engine, *, items: int, models: int, cycles: int) -> str:
    """A project with that history; returns its name."""
    rng = np.random.default_rng(0)
    now = utcnow()
    with db.session_scope(engine) as session:
        project = Project(
            name="console-bench",
            labels=LABELS,
            modality="image",
            store_url="file:///nowhere",
            image_size=32,
            image_channels=1,
            loss_config={},
            selection_config={},
            label_budget=20_000,
        )
        session.add(project)
        session.flush()
        pid = project.id or 0
    _items(engine, pid, items)
    with db.session_scope(engine) as session:
        for version in range(1, models + 1):
            session.add(
                DatasetVersion(
                    project_id=pid,
                    version=version,
                    parent_version=version - 1 or None,
                    state=DatasetVersionState.COMMITTED,
                    row_count=50 * version,
                    class_counts={label: 5 * version for label in LABELS},
                    committed_at=now,
                )
            )
            session.add(
                ModelVersion(
                    project_id=pid,
                    version=version,
                    dataset_version=version,
                    artifact_uri="file:///nowhere",
                    parameters={},
                    metrics=(metrics := _metrics(rng, version)),
                    summary=curve_summary(metrics),
                    promotion=Promotion.CURRENT if version == models else Promotion.RETIRED,
                )
            )
        timeline = [
            {"state": state, "at": (now - timedelta(seconds=60 - 10 * k)).isoformat()}
            for k, state in enumerate(
                ("pending", "training", "scoring", "selecting", "handing_off", "done")
            )
        ]
        for number in range(1, cycles + 1):
            last = number == cycles
            session.add(
                Cycle(
                    project_id=pid,
                    number=number,
                    state=CycleState.SCORING if last else CycleState.DONE,
                    trigger="bench",
                    timeline=timeline[:3] if last else timeline,
                    chunks_total=100,
                    chunks_done=40 if last else 100,
                    selected_count=None if last else 50,
                    finished_at=None if last else now,
                )
            )
        for event in range(100):
            session.add(
                InboxEvent(
                    source="label_studio",
                    event_key=f"bench-{event}",
                    action="ANNOTATION_CREATED",
                    project_id=pid,
                    payload={},
                    error="label 'cat' is not in the label set",
                )
            )
    with engine.begin() as connection:
        # Every labeled item's answer, and a task for every labeled and queued item.
        connection.execute(
            sa.insert(Annotation).from_select(
                ["project_id", "item_id", "label", "source", "external_id",
                 "external_updated_at", "annotator", "created_at", "cancelled"],
                sa.select(
                    sa.literal(pid), sa.column("id"), sa.column("label"),
                    sa.literal("simulated"), sa.cast(sa.column("id"), sa.String),
                    sa.literal(now), sa.literal("sim"), sa.literal(now), sa.false(),
                )
                .select_from(sa.table("item"))
                .where(sa.column("status") == "labeled"),
            )
        )  # fmt: skip
        connection.execute(
            sa.insert(LabelTask).from_select(
                ["project_id", "item_id", "kind", "state", "note", "prediction_score",
                 "prediction_label", "created_at", "updated_at"],
                sa.select(
                    sa.literal(pid), sa.column("id"), sa.literal("label"),
                    sa.case((sa.column("status") == "queued", "open"), else_="answered"),
                    sa.literal(""), sa.literal(0.3), sa.literal(LABELS[0]), sa.literal(now),
                    sa.literal(now),
                )
                .select_from(sa.table("item"))
                .where(sa.column("status").in_(["labeled", "queued"])),
            )
        )  # fmt: skip
    if engine.dialect.name == "postgresql":
        # What autovacuum would have done to a database this old by now: statistics, and the
        # visibility map that index-only scans use (without it they visit the heap), so that
        # autovacuum does not start on the fresh tables while requests are timed.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE")
    return "console-bench"


def _time(
    client: TestClient,
    path: str,
    repeats: int,
    *,
    before: Callable[[int], None] | None = None,
    label: str | None = None,
    **kwargs: Any,
) -> EndpointTime:
    """`before(run)`, when given, runs untimed before each request."""
    answer = client.get(path, **kwargs)  # warm: the first call pays imports and caches
    assert answer.status_code == 200, f"{path}: {answer.status_code} {answer.text[:300]}"
    times = []
    for run in range(repeats):
        if before is not None:
            before(run)
        start = time.perf_counter()
        answer = client.get(path, **kwargs)
        times.append((time.perf_counter() - start) * 1000)
        assert answer.status_code == 200
    return EndpointTime(label or path, statistics.median(times), max(times), len(answer.content))


def _change_a_model(engine: sa.Engine, name: str) -> Callable[[int], None]:
    """A change the project page's cached curve must notice: the oldest model's promotion
    reason, new on every run (as a promotion or a rollback rewrites it)."""

    def change(run: int) -> None:
        with engine.begin() as connection:
            project_id = connection.execute(
                sa.select(col(Project.id)).where(col(Project.name) == name)
            ).scalar_one()
            connection.execute(
                sa.update(ModelVersion)
                .where(col(ModelVersion.project_id) == project_id, col(ModelVersion.version) == 1)
                .values(promotion_reason=f"changed for run {run}")
            )

    return change


def run_console_bench(
    *, items: int, models: int, cycles: int, repeats: int, database: str
) -> tuple[list[EndpointTime], EndpointTime, float]:
    """(the console's endpoints, the REST baseline, seconds spent seeding)."""
    with tempfile.TemporaryDirectory(prefix="focalloop-bench-console-") as scratch:
        folder = Path(scratch)
        with _database(database, folder) as url:
            engine = db.make_engine(url)
            try:
                db.upgrade(engine)
                started = time.perf_counter()
                name = seed(engine, items=items, models=models, cycles=cycles)
                seeding_s = time.perf_counter() - started
                with db.session_scope(engine) as session:
                    _, token = create_token(session, name="bench", scope="read", actor="bench")
                settings = Settings(data_dir=folder / "data", database_url=url)
                app = create_app(settings, engine=engine)
                freeze_startup_objects()  # as `focalloop api` does once its app is built
                with TestClient(app) as client:
                    client.post("/console/sign-in", data={"token": token}, headers=SAME_ORIGIN)
                    paths = [
                        "/console/",
                        "/console/data/projects",
                        f"/console/projects/{name}",
                        f"/console/data/projects/{name}/live",
                        f"/console/data/projects/{name}/curve",
                    ]
                    timed = [_time(client, path, repeats) for path in paths]
                    timed.insert(
                        3,
                        _time(
                            client,
                            paths[2],
                            repeats,
                            before=_change_a_model(engine, name),
                            label=f"{paths[2]} (first view after a model changed)",
                        ),
                    )
                    baseline = _time(
                        client,
                        f"/api/v1/projects/{name}",
                        repeats,
                        headers={"Authorization": f"Bearer {token}"},
                    )
            finally:
                engine.dispose()
    return timed, baseline, seeding_s


def as_rows(timed: list[EndpointTime], baseline: EndpointTime) -> list[dict[str, Any]]:
    return [
        asdict(t) | {"vs_baseline": t.median_ms / baseline.median_ms} for t in [*timed, baseline]
    ]
