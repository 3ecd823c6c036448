"""Every state change made from the command line leaves an audit entry, as the API's do. Before,
`project create`, `pool add`, `cycle start` and `cycle cancel` from the CLI left none (only
`model rollback` did) although the README says every change is audited.

The first test classifies every command the CLI has, so a new command that changes state cannot
be added without deciding what it audits; the second runs each audited one and reads the log."""

import getpass
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import sqlalchemy as sa
import typer
from sqlmodel import select
from typer.testing import CliRunner

from services import db
from services.cli import app
from services.config import get_settings
from services.models import AuditEntry
from tests.conftest import Digits
from tests.integration.conftest import PrivateRedis, unique_name

# Commands that read and print; they change nothing.
READ_ONLY = {
    "version",
    "db current",
    "project list",
    "project show",
    "pool show",
    "datasets list",
    "datasets show",
    "datasets diff",
    "datasets verify",
    "datasets export",
    "cycle status",
    "labelstudio status",
    "token list",
    "model list",
}
# Long-running servers: what they do is audited by the routes and stages they run.
SERVERS = {"api", "worker", "beat", "up"}
# Commands that make a deployment of their own (a temporary database) and report on it.
SELF_CONTAINED = {"simulate", "demo"}
# Writes a dataset version straight into a store, with no state database involved.
STORE_ONLY = {"datasets commit"}
# Creates or migrates the schema itself.
SCHEMA = {"db upgrade"}
# Everything else changes the state database and must say so in the audit log.
AUDITED = {
    "project create": "project.create",
    "project update": "project.update",
    "project pause": "project.pause",
    "project resume": "project.resume",
    "project labeler": "project.labeler",
    "pool add": "pool.add",
    "datasets snapshot": "dataset.snapshot",
    "cycle start": "cycle.start",
    "cycle cancel": "cycle.cancel",
    "labelstudio connect": "labelstudio.connect",
    "labelstudio sync": "labelstudio.sync",
    "labelstudio push": "labelstudio.push",
    "token create": "token.create",
    "token revoke": "token.revoke",
    "model promote": "model.promote",
    "model rollback": "model.rollback",
    "tune": "project.tune",  # with --apply; tests/integration/test_tune.py
}


def every_command() -> set[str]:
    def walk(command: object, path: list[str]) -> Iterator[str]:
        children = getattr(command, "commands", None)
        if not children:
            yield " ".join(path)
            return
        for name, child in children.items():
            yield from walk(child, [*path, name])

    return set(walk(typer.main.get_command(app), []))


def test_every_command_is_classified_once() -> None:
    commands = every_command()
    bench = {command for command in commands if command.startswith("bench ")}
    groups = [READ_ONLY, SERVERS, SELF_CONTAINED, STORE_ONLY, SCHEMA, set(AUDITED), bench]
    classified = set().union(*groups)
    assert commands - classified == set(), "classify the new command in this test"
    assert classified - commands == set(), "a classified command no longer exists"
    assert sum(len(group) for group in groups) == len(classified), "a command is in two groups"


@pytest.fixture
def cli(
    tmp_path: Path, private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[CliRunner, sa.Engine]]:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    monkeypatch.setenv("FOCALLOOP_DATABASE_URL", url)
    monkeypatch.setenv("FOCALLOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FOCALLOOP_BROKER_URL", private_redis.url)
    monkeypatch.setenv("COLUMNS", "200")
    get_settings.cache_clear()
    engine = db.make_engine(url)
    db.upgrade(engine)
    yield CliRunner(), engine
    engine.dispose()
    get_settings.cache_clear()


def test_each_audited_command_records_who_did_what(
    cli: tuple[CliRunner, sa.Engine], tmp_path: Path, digits: Digits
) -> None:
    runner, engine = cli

    def run(*args: str) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result.output

    name = unique_name("audited")
    ids = np.array([f"d{i:03d}" for i in range(120)])
    np.savez(tmp_path / "pool.npz", features=digits.features[:120], item_ids=ids)
    truth = pa.table(
        {"item_id": ids.tolist(), "label": np.where(digits.labels[:120] == 8, "8", "x").tolist()}
    )
    pacsv.write_csv(truth, tmp_path / "truth.csv")

    run("project", "create", name, "--labels", "x,8", "--modality", "features",
        "--store", f"file://{tmp_path / 'store'}")  # fmt: skip
    run("project", "update", name, "--batch-size", "10", "--unset", "label_budget")
    run("project", "pause", name)
    run("project", "resume", name)
    run("pool", "add", name, "--from", str(tmp_path / "pool.npz"))
    run("project", "labeler", name, "--simulated-truth", str(tmp_path / "truth.csv"))
    run("datasets", "snapshot", name)
    run("cycle", "start", name)
    run("cycle", "cancel", name)
    token_line = run("token", "create", "ops", "--scope", "read", "--project", name)
    token_id = next(word for word in token_line.split() if word.isdigit())
    run("token", "revoke", token_id)

    with db.session_scope(engine) as session:
        entries = session.exec(select(AuditEntry).order_by(sa.column("id"))).all()
        log = [(entry.actor, entry.action, entry.target, entry.detail) for entry in entries]
    actor = f"cli:{getpass.getuser()}"
    assert {who for who, *_ in log} == {actor}, log
    assert [action for _, action, *_ in log] == [
        "project.create",
        "project.update",
        "project.pause",
        "project.resume",
        "pool.add",
        "project.labeler",
        "dataset.snapshot",
        "cycle.start",
        "cycle.cancel",
        "token.create",
        "token.revoke",
    ], log
    by_action = {action: (target, detail) for _, action, target, detail in log}
    assert by_action["project.update"][1] == {"batch_size": 10, "label_budget": None}
    assert by_action["pool.add"][0] == str(tmp_path / "pool.npz")
    assert by_action["pool.add"][1]["added"] == 120
    assert by_action["dataset.snapshot"][0] == "dataset:v1"
    assert by_action["cycle.start"][0] == by_action["cycle.cancel"][0]
    assert by_action["cycle.start"][0].startswith("cycle:")
