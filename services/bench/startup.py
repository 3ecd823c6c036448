"""`focalloop bench startup`: how long the command line and the API take to answer, against the
bare interpreter's start in the same run.

    python          `python -c pass`: the floor every command pays
    --help          `focalloop --help`: every command defined, none run
    version         `focalloop version`
    api             `focalloop api` on a free port (a fresh SQLite data dir) until
                    GET /api/v1/health answers 200: imports, app factory, uvicorn's start

Each is a fresh process, timed from spawn to exit (or to the first 200), median of `repeats`.
"""

import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from services.config import Settings, child_environment
from services.servers import FOCALLOOP, free_port


@dataclass(frozen=True)
class StartupRow:
    what: str
    seconds: list[float]
    median_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed_run(command: list[str], environment: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=environment, capture_output=True, check=True, timeout=120)
    return time.perf_counter() - started


def _api_boot(settings: Settings, folder: Path) -> float:
    port = free_port()
    environment = child_environment(settings.model_copy(update={"data_dir": folder}))
    started = time.perf_counter()
    process = subprocess.Popen(
        [FOCALLOOP, "api", "--port", str(port)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.perf_counter() - started < 120:
            if process.poll() is not None:
                raise RuntimeError(f"focalloop api exited with {process.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).is_success:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                time.sleep(0.02)
        raise RuntimeError("focalloop api did not answer within 120 s")
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_startup_bench(settings: Settings, *, repeats: int) -> list[StartupRow]:
    environment = child_environment(settings)
    timings: dict[str, list[float]] = {"python": [], "--help": [], "version": [], "api": []}
    with tempfile.TemporaryDirectory(prefix="focalloop-startup-") as scratch:
        for repeat in range(repeats):
            timings["python"].append(_timed_run([sys.executable, "-c", "pass"], environment))
            timings["--help"].append(_timed_run([FOCALLOOP, "--help"], environment))
            timings["version"].append(_timed_run([FOCALLOOP, "version"], environment))
            timings["api"].append(_api_boot(settings, Path(scratch) / f"api-{repeat}"))
    return [
        StartupRow(what=what, seconds=values, median_seconds=statistics.median(values))
        for what, values in timings.items()
    ]
