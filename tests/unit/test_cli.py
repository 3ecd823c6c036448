"""The `focalloop` console script, run as a user runs it (a real subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

FOCALLOOP = str(Path(sys.executable).with_name("focalloop"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FOCALLOOP, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


def test_bench_focal_loss_writes_every_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run(
        "bench",
        "focal-loss",
        "--n",
        "256",
        "--classes",
        "4",
        "--classes",
        "7",
        "--repeats",
        "3",
        "--no-compiled",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "focal-loss"
    assert payload["command"].startswith("focalloop bench focal-loss --n 256")
    rows = payload["rows"]
    assert [(r["name"], r["classes"]) for r in rows] == [
        (name, c) for c in (4, 7) for name in ("focal", "focal+alpha", "sigmoid focal")
    ]
    for row in rows:
        assert row["ratio"] > 0 and row["ratio"] == row["ours_ms"] / row["baseline_ms"]
    assert payload["summary"]["max_eager_ratio"] == max(r["ratio"] for r in rows)
    assert "sigmoid focal" in result.stdout


def test_bad_options_end_with_a_message_not_a_traceback() -> None:
    result = run("bench", "focal-loss", "--device", "tpu")
    assert result.returncode == 2
    assert "device must be cpu, cuda or auto" in result.stderr
    assert "Traceback" not in result.stderr


def test_version() -> None:
    result = run("version")
    assert result.returncode == 0 and result.stdout.startswith("focalloop 0.1.0")
