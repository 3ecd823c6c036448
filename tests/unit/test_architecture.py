"""The layout's rules that no linter checks: module and stage sizes, one declared flow that every
runner covers, the labeler registry, and a command line that loads no heavy library to answer
`--help` or `version`. (Import directions: `lint-imports`; dead code: `vulture`, both in
`make test`.)"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from labeling.registry import LABELERS, labeler_of_source
from services.cycle.flow import FOLLOWS, Stage, task_name
from services.cycle.stages import STAGES
from workers.app import GPU_TASKS
from workers.tasks import TASKS

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "workers", "labeling", "tests", "infra")
MAX_MODULE_LINES = 500
MAX_STAGE_FUNCTION_LINES = 60  # one screen


def _modules() -> list[Path]:
    return sorted(
        path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if ".venv" not in path.parts
    )


def test_no_module_is_longer_than_500_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for path in _modules()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_every_function_of_the_cycle_fits_on_one_screen() -> None:
    long = {}
    for path in sorted((ROOT / "services" / "cycle").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_STAGE_FUNCTION_LINES:
                    long[f"{path.name}:{node.name}"] = lines
    assert long == {}


def test_the_learning_core_and_selection_import_nothing_of_the_project_but_errors() -> None:
    """services/ml and services/selection are pure (lint-imports forbids a list of modules;
    this allows only the leaf error module, so a new project module cannot slip in)."""
    allowed = ("services.errors", "services.ml", "services.selection")
    found = {}
    for package in ("ml", "selection"):
        for path in sorted((ROOT / "services" / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                for name in names:
                    ours = name.split(".")[0] in ("services", "labeling", "workers", "tests")
                    if ours and not name.startswith(allowed):
                        found[f"{package}/{path.name}"] = name
    assert found == {}


def test_the_flow_is_declared_once_and_every_runner_covers_it() -> None:
    assert set(FOLLOWS) == set(Stage)
    assert set(STAGES) == set(Stage)  # the in-process runner and the tasks run these
    assert set(TASKS) == set(Stage)
    assert {task_name(stage) for stage in Stage} == {
        task.name  # type: ignore[attr-defined]
        for task in TASKS.values()
    }
    # Training, scoring and tuning trials need the accelerator; everything else is io. (The
    # wire names are spelled out on purpose: renaming a stage must not move it off the gpu
    # queue.)
    assert set(GPU_TASKS) == {"focalloop.train", "focalloop.score_chunk", "focalloop.tune_trial"}


def test_every_labeler_is_found_by_its_kind_and_by_its_answers_source() -> None:
    sources = [make().source for make in LABELERS.values()]
    assert len(set(sources)) == len(sources)
    for kind, make in LABELERS.items():
        found = labeler_of_source(make().source)
        assert found is not None and type(found) is type(make()), kind
    assert labeler_of_source("somewhere-else") is None


@pytest.mark.timeout(120)
def test_the_command_line_loads_no_heavy_library_to_answer() -> None:
    """`focalloop --help` and `version` build every command without importing what the
    commands call (measured: 0.2 s instead of 5.2 s; BENCHMARKS.md)."""
    heavy = ["torch", "sklearn", "sqlalchemy", "sqlmodel", "label_studio_sdk", "celery", "boto3"]
    script = (
        "import sys\n"
        "from services.cli import app\n"
        "import typer.main\n"
        "typer.main.get_command(app)\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=100, check=True
    )
    assert loaded.stdout.strip() == "[]", loaded.stderr
