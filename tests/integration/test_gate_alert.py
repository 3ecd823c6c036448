"""Rejections in a row: the alert in the metrics, `focalloop cycle status` and the `up`
terminal's watch, raised at `alert_after_rejections` and cleared by the next promotion."""

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import generate_latest
from rich.console import Console
from sqlmodel import select
from typer.testing import CliRunner

from services import db
from services.api.metrics import metrics_registry
from services.cli import app
from services.commands.gate_watch import GateWatch
from services.config import get_settings
from services.models import ModelVersion, Promotion
from services.projects import get_project
from services.promotion import gate_alert, rejections_in_a_row
from tests.conftest import Digits
from tests.integration.cycle_helpers import make_digits_project


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[sa.Engine]:
    """A SQLite state database the CLI reads too (through the environment)."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    monkeypatch.setenv("FOCALLOOP_DATABASE_URL", url)
    monkeypatch.setenv("FOCALLOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "250")
    get_settings.cache_clear()
    engine = db.make_engine(url)
    db.upgrade(engine)
    yield engine
    engine.dispose()
    get_settings.cache_clear()


def _add_model(engine: sa.Engine, name: str, promotion: Promotion) -> None:
    """A model version row with the gate's decision (the rest of the loop is not needed here)."""
    with db.session_scope(engine) as session:
        project = get_project(session, name)
        existing = session.exec(
            select(ModelVersion).where(ModelVersion.project_id == project.id)
        ).all()
        if promotion == Promotion.CURRENT:
            for row in existing:
                if row.promotion == Promotion.CURRENT:
                    row.promotion = Promotion.RETIRED
                    session.add(row)
        version = len(existing) + 1
        session.add(
            ModelVersion(
                project_id=project.id or 0,
                version=version,
                dataset_version=1,
                artifact_uri=f"models/m{version}",
                parameters={},
                metrics={},
                promotion=promotion,
                promotion_reason=f"{promotion} (test)",
            )
        )


def _metric(engine: sa.Engine, series: str, name: str) -> float:
    text = generate_latest(metrics_registry(engine)[0]).decode()
    prefix = f'{series}{{project="{name}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, text
    return float(lines[0].removeprefix(prefix))


def test_rejections_in_a_row_raise_the_alert_everywhere_and_a_promotion_clears_it(
    state: sa.Engine, tmp_path: Path, digits: Digits
) -> None:
    settings = get_settings()
    name = make_digits_project(
        state, settings, digits, tmp_path / "p", n_items=60, gate={"alert_after_rejections": 2}
    ).name
    printed = io.StringIO()
    watch = GateWatch(state, Console(file=printed, width=250))
    _add_model(state, name, Promotion.CURRENT)
    _add_model(state, name, Promotion.REJECTED)
    with db.session_scope(state) as session:
        project = get_project(session, name)
        assert (rejections_in_a_row(session, project), gate_alert(session, project)) == (1, None)
    assert watch.check() == []
    assert _metric(state, "focalloop_gate_alert", name) == 0

    _add_model(state, name, Promotion.REJECTED)
    expected = (
        f"project {name!r}: the gate rejected the last 2 models in a row; m1 still scores the "
        f"pool (see `focalloop model list {name}`)"
    )
    with db.session_scope(state) as session:
        assert gate_alert(session, get_project(session, name)) == expected
    assert (
        _metric(state, "focalloop_gate_alert", name),
        _metric(state, "focalloop_gate_rejections_in_a_row", name),
    ) == (1, 2)
    # The watch prints it once, and again only when the run grows.
    assert watch.check() == [expected]
    assert watch.check() == []
    _add_model(state, name, Promotion.REJECTED)
    assert [line.split("last ")[1][:1] for line in watch.check()] == ["3"]
    assert printed.getvalue().count("gate alert") == 2
    status = CliRunner().invoke(app, ["cycle", "status", name])
    assert status.exit_code == 0, status.output
    assert "gate alert" in status.output and "rejected the last 3 models" in status.output

    _add_model(state, name, Promotion.CURRENT)
    assert watch.check() == []
    assert _metric(state, "focalloop_gate_alert", name) == 0
    assert "gate alert" not in CliRunner().invoke(app, ["cycle", "status", name]).output
