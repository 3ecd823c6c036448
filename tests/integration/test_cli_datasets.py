"""The issue's "done when", from the command line: create a project, add a pool from a folder or
an S3 prefix, commit, verify and export dataset versions, on SQLite and on PostgreSQL.

Commands run in-process through typer's runner (a subprocess per command would spend most of
the test importing torch); `tests/unit/test_cli.py` covers the console script's exit codes.
"""

from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from services.cli import app
from services.config import Settings, get_settings
from services.datasets.store import open_store, s3_client
from services.datasets.versions import read_manifest
from tests.conftest import Digits
from tests.integration.conftest import unique_name
from tests.integration.test_pool import digit_png

Run = Callable[..., str]


@pytest.fixture
def cli(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Run]:
    """Run `focalloop ARGS` against this test's database and the session's S3 server."""
    backend = request.param
    url = (
        f"sqlite:///{tmp_path / 'state.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_database_url")
    )
    monkeypatch.setenv("FOCALLOOP_DATABASE_URL", url)
    monkeypatch.setenv("FOCALLOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FOCALLOOP_S3_ENDPOINT_URL", settings.s3_endpoint_url or "")
    monkeypatch.setenv("FOCALLOOP_S3_REGION", "us-east-1")
    monkeypatch.setenv("FOCALLOOP_S3_ACCESS_KEY_ID", "focalloop-test")
    monkeypatch.setenv("FOCALLOOP_S3_SECRET_ACCESS_KEY", "focalloop-test-secret")
    monkeypatch.setenv("COLUMNS", "200")
    get_settings.cache_clear()
    runner = CliRunner()

    def run(*args: str, exit_code: int = 0) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == exit_code, (args, result.output, result.exception)
        return result.output

    yield run
    get_settings.cache_clear()


@pytest.mark.parametrize("cli", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize("source_kind", ["folder", "s3-prefix"])
def test_new_user_flow(
    cli: Run, source_kind: str, tmp_path: Path, settings: Settings, digits: Digits
) -> None:
    name = unique_name("cli")
    if source_kind == "folder":
        folder = tmp_path / "images"
        folder.mkdir()
        for i in range(12):
            (folder / f"{i:02d}.png").write_bytes(digit_png(digits, i))
        source = str(folder)
    else:
        bucket = unique_name("raw")
        client = s3_client(settings)
        client.create_bucket(Bucket=bucket)
        for i in range(12):
            client.put_object(Bucket=bucket, Key=f"in/{i:02d}.png", Body=digit_png(digits, i))
        source = f"s3://{bucket}/in"
    store = f"s3://{unique_name('ds')}/versions"

    cli("db", "upgrade")
    cli(
        "project",
        "create",
        name,
        "--labels",
        "other,eight",
        "--modality",
        "image",
        "--store",
        store,
        "--image-size",
        "8",
    )
    assert name in cli("project", "list")
    assert "12 added" in cli("pool", "add", name, "--from", source)
    assert "12 duplicates" in cli("pool", "add", name, "--from", source)
    shown = cli("pool", "show", name)
    assert "│ unlabeled           │ 12    │" in shown

    labels = tmp_path / "labels.csv"
    labels.write_text("item_id,uri,label\n00.png,x,other\n08.png,y,eight\n")
    cli("datasets", "commit", "--store", store, "--project", name, "--from", str(labels))
    relabeled = tmp_path / "labels2.jsonl"
    relabeled.write_text(
        '{"item_id": "00.png", "uri": "x", "label": "eight"}\n'
        '{"item_id": "01.png", "uri": "z", "label": "other"}\n'
    )
    cli("datasets", "commit", "--store", store, "--project", name, "--from", str(relabeled))
    listing = cli("datasets", "list", "--store", store, "--project", name)
    assert "eight=1, other=1" in listing  # no --labels: the classes sorted
    diff = cli("datasets", "diff", "--store", store, "--project", name, "1", "2")
    assert "1 added, 1 relabeled, 1 withdrawn" in diff
    assert "v1: ok" in cli("datasets", "verify", "--store", store, "--project", name)

    out = tmp_path / "export.parquet"
    cli(
        "datasets",
        "export",
        "--store",
        store,
        "--project",
        name,
        "--version",
        "2",
        "--to",
        str(out),
    )
    exported = pq.read_table(out)
    assert exported["item_id"].to_pylist() == ["00.png", "01.png"]
    assert exported["label"].to_pylist() == ["eight", "other"]

    # A second commit of an existing version number is refused and changes nothing.
    result = CliRunner().invoke(
        app,
        [
            "datasets",
            "commit",
            "--store",
            store,
            "--project",
            name,
            "--from",
            str(labels),
            "--version",
            "2",
        ],
    )
    assert result.exit_code != 0
    assert "already committed" in str(result.exception)

    # Corrupt one object behind focalloop's back: verify exits 1 and names it.
    bucket, prefix = store.removeprefix("s3://").split("/", 1)
    manifest = read_manifest(open_store(store, settings), name, 2)
    client = s3_client(settings)
    client.put_object(Bucket=bucket, Key=f"{prefix}/{manifest.objects[0].key}", Body=b"tampered")
    report = cli("datasets", "verify", "--store", store, "--project", name, exit_code=1)
    assert "does not match its manifest entry" in report


@pytest.mark.parametrize("cli", ["sqlite"], indirect=True)
def test_snapshot_from_the_database_and_csv_export(
    cli: Run, tmp_path: Path, digits: Digits
) -> None:
    name = unique_name("snap")
    folder = tmp_path / "seeded"
    folder.mkdir()
    lines = ["item_id,uri,label"]
    for i in range(6):
        (folder / f"{i}.png").write_bytes(digit_png(digits, i))
        lines.append(f"i{i},{i}.png,{'other' if i < 4 else ''}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    store = f"file://{tmp_path / 'store'}"
    cli("db", "upgrade")
    cli(
        "project",
        "create",
        name,
        "--labels",
        "other,eight",
        "--modality",
        "image",
        "--store",
        store,
    )
    assert "4 with seed labels" in cli("pool", "add", name, "--from", str(folder / "manifest.csv"))
    assert "v1: 4 labeled items" in cli("datasets", "snapshot", name)
    out = tmp_path / "v1.csv"
    cli(
        "datasets",
        "export",
        "--store",
        store,
        "--project",
        name,
        "--version",
        "1",
        "--to",
        str(out),
    )
    rows = out.read_text().splitlines()
    assert rows[0].startswith('"item_id","uri","content_hash","label"')
    assert len(rows) == 5
    shown = cli("datasets", "show", "--store", store, "--project", name)
    assert '"lineage": [\n    1\n  ]' in shown
    # Removing a class is refused with the reason.
    result = CliRunner().invoke(app, ["project", "update", name, "--labels", "other,cat"])
    assert result.exit_code != 0
    assert "cannot remove or rename" in str(result.exception)
