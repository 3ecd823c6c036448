"""`focalloop bench manifest`: commit and read back a large dataset version, against pyarrow.

For each backend (a local directory; S3 over HTTP) and direction:
    commit  normalize_items + commit_version (serialize, SHA-256, write-once puts, manifest)
    read    read_version (manifest, gets, SHA-256 verification of every object, parse, concat)
against the floor, measured in the same run on the same table: a plain `pq.write_table` /
`pq.read_table` of the whole table with the same compression, to a local file for the local
backend and through pyarrow's own S3 filesystem to the same server for S3. Our side and the
floor alternate, and each repeat commits under a new project name so every commit really writes.
"""

import logging
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from services.config import Settings
from services.datasets.store import DatasetStore, open_store
from services.datasets.versions import commit_version, normalize_items, read_version
from services.errors import InvalidInput

LABELS = ["ok", "scratch", "dent", "stain", "crack"]
_ACCESS_KEY = "focalloop-bench"
_SECRET_KEY = "focalloop-bench-secret"


def synthetic_items(n: int, *, seed: int = 0) -> pa.Table:
    """n labeled items shaped like a real version: unique ids, S3 uris, 64-hex content hashes,
    a long-tailed label distribution, 50 annotators, spread-out annotation times."""
    rng = np.random.default_rng(seed)
    ids = np.char.add("item-", np.char.zfill(np.arange(n).astype(str), 8))
    uris = np.char.add(np.char.add("s3://pool/images/", ids), ".png")
    hashes = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    hex_hashes = [row.tobytes().hex() for row in hashes]
    label_index = rng.choice(len(LABELS), size=n, p=[0.9, 0.04, 0.03, 0.02, 0.01])
    annotators = np.char.add("annotator-", rng.integers(0, 50, size=n).astype(str))
    start = datetime(2026, 1, 1, tzinfo=UTC)
    seconds = rng.integers(0, 300 * 86400, size=n)
    times = pa.array(
        [start + timedelta(seconds=int(s)) for s in seconds], pa.timestamp("us", tz="UTC")
    )
    return pa.table(
        {
            "item_id": pa.array(ids.tolist(), pa.string()),
            "uri": pa.array(uris.tolist(), pa.string()),
            "content_hash": pa.array(hex_hashes, pa.string()),
            "label": pa.array(np.array(LABELS)[label_index].tolist(), pa.string()),
            "label_source": pa.array(["label_studio"] * n, pa.string()),
            "annotator": pa.array(annotators.tolist(), pa.string()),
            "annotated_at": times,
        }
    )


@dataclass(frozen=True)
class ManifestBenchRow:
    """Median seconds over `repeats` runs; ratio_to_floor = seconds / floor_seconds."""

    backend: str
    direction: str
    items: int
    seconds: float
    floor_seconds: float
    ratio_to_floor: float
    repeats: int
    bytes_stored: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def moto_endpoint() -> Iterator[str]:
    """An S3 server (moto) on a free loopback port for the benchmark's lifetime."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise InvalidInput(
            "the S3 rows need an S3 server: install moto[server] (the dev extra) or pass "
            "--s3-endpoint"
        ) from None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The server logs every request through werkzeug; the benchmark's table is its output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _median_pair(
    ours: Callable[[], object], floor: Callable[[], object], repeats: int
) -> tuple[float, float]:
    ours_times: list[float] = []
    floor_times: list[float] = []
    for repeat in range(repeats):
        pair = [(ours, ours_times), (floor, floor_times)]
        for work, times in pair if repeat % 2 == 0 else reversed(pair):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
    return statistics.median(ours_times), statistics.median(floor_times)


def _bench_backend(
    backend: str,
    store: DatasetStore,
    floor_fs: pafs.FileSystem,
    floor_dir: str,
    table: pa.Table,
    repeats: int,
) -> list[ManifestBenchRow]:
    now = datetime.now(UTC)
    projects: list[str] = []
    floor_paths: list[str] = []

    def commit() -> None:
        project = f"bench-{uuid.uuid4().hex[:12]}"
        projects.append(project)
        items = normalize_items(table, labels=LABELS, now=now)
        commit_version(
            store,
            project=project,
            version=1,
            parent_version=None,
            items=items,
            labels=LABELS,
            created_at=now,
        )

    def floor_write() -> None:
        path = f"{floor_dir}/floor-{uuid.uuid4().hex[:12]}.parquet"
        floor_paths.append(path)
        pq.write_table(table, path, filesystem=floor_fs, compression="zstd")

    commit_s, floor_write_s = _median_pair(commit, floor_write, repeats)
    read_targets = iter(projects * 2)
    floor_targets = iter(floor_paths * 2)

    def read() -> None:
        _, loaded = read_version(store, next(read_targets), 1)
        assert loaded.num_rows == table.num_rows

    def floor_read() -> None:
        loaded = pq.read_table(next(floor_targets), filesystem=floor_fs)
        assert loaded.num_rows == table.num_rows

    read_s, floor_read_s = _median_pair(read, floor_read, repeats)
    stored = sum(len(store.get(key)) for key in store.list_keys(f"{projects[0]}/datasets/objects/"))
    return [
        ManifestBenchRow(
            backend,
            "commit",
            table.num_rows,
            commit_s,
            floor_write_s,
            commit_s / floor_write_s,
            repeats,
            stored,
        ),
        ManifestBenchRow(
            backend,
            "read",
            table.num_rows,
            read_s,
            floor_read_s,
            read_s / floor_read_s,
            repeats,
            stored,
        ),
    ]


def run_manifest_bench(
    *, items: int, repeats: int, backends: list[str], s3_endpoint: str | None
) -> list[ManifestBenchRow]:
    """Rows for each backend in `backends` ("local", "s3") and direction."""
    unknown = set(backends) - {"local", "s3"}
    if unknown:
        raise InvalidInput(f"unknown backends {sorted(unknown)}: choose local and/or s3")
    table = synthetic_items(items)
    rows: list[ManifestBenchRow] = []
    with tempfile.TemporaryDirectory(prefix="focalloop-bench-") as scratch:
        if "local" in backends:
            store = open_store(f"file://{scratch}/store", Settings(), create=True)
            Path(scratch, "floor").mkdir()
            rows += _bench_backend(
                "local", store, pafs.LocalFileSystem(), f"{scratch}/floor", table, repeats
            )
        if "s3" in backends:
            with _s3(s3_endpoint) as endpoint:
                settings = Settings(
                    s3_endpoint_url=endpoint,
                    s3_region="us-east-1",
                    s3_access_key_id=_ACCESS_KEY,
                    s3_secret_access_key=_SECRET_KEY,  # type: ignore[arg-type]
                )
                bucket = f"focalloop-bench-{uuid.uuid4().hex[:8]}"
                store = open_store(f"s3://{bucket}/store", settings, create=True)
                parts = urlsplit(endpoint)
                floor_fs = pafs.S3FileSystem(
                    access_key=_ACCESS_KEY,
                    secret_key=_SECRET_KEY,
                    endpoint_override=parts.netloc,
                    scheme=parts.scheme,
                    region="us-east-1",
                )
                rows += _bench_backend("s3", store, floor_fs, f"{bucket}/floor", table, repeats)
    return rows


@contextmanager
def _s3(endpoint: str | None) -> Iterator[str]:
    if endpoint:
        yield endpoint
        return
    with moto_endpoint() as started:
        yield started
