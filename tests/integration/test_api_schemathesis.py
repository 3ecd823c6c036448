"""Property-based tests of the API from its own OpenAPI schema (schemathesis, every check on):
no 5xx on any operation, responses that match the schema, and a run that really reaches the
handlers (fewer than 5% of answers are 401/403)."""

import base64
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from pydantic import SecretStr
from schemathesis.config import SchemathesisConfig

from labeling.simulated import set_simulated_labeler
from services import db
from services.api.app import create_app
from services.auth import create_token
from services.config import Settings
from services.cycle.runner import run_cycle
from services.cycle.trigger import maybe_start_cycle
from services.datasets.pool import add_to_pool
from services.heartbeats import QUEUES, record_heartbeat
from services.projects import ProjectSpec, create_project, get_project
from tests.conftest import Digits
from tests.integration.conftest import PrivateRedis

EXAMPLES_PER_OPERATION = 25
WEBHOOK_SECRET = "schemathesis-webhook-secret"
# Every check stays on. A schema-valid request may still break a rule the schema cannot state (a
# pool source outside the trusted roots, a paused project, gate settings out of range), which the
# API answers 422 with the reason, or a webhook body that is not a Label Studio event (400), so
# the positive-data check also accepts those.
CONFIG = {
    "checks": {
        "positive_data_acceptance": {
            "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "422"]
        }
    },
}


@pytest.fixture(scope="module")
def app_under_test(tmp_path_factory: pytest.TempPathFactory, digits: Digits) -> Iterator[FastAPI]:
    folder = tmp_path_factory.mktemp("schemathesis")
    # A real broker: /ready checks it (503 without), and started cycles send their training.
    broker = PrivateRedis(folder / "redis")
    broker.start()
    engine = db.make_engine(f"sqlite:///{folder / 'state.db'}")
    db.upgrade(engine)
    settings = Settings(
        data_dir=folder / "data",
        source_roots=[f"file://{folder / 'sources'}"],
        broker_url=broker.url,
        webhook_secret=SecretStr(WEBHOOK_SECRET),
        heartbeat_stale_s=86_400.0,  # /ready wants a worker: the one heard from below
    )
    (folder / "sources").mkdir()
    ids = np.array([f"d{i:03d}" for i in range(200)])
    np.savez(folder / "sources" / "pool.npz", features=digits.features[:200], item_ids=ids)
    truth = pa.table(
        {
            "item_id": ids.tolist(),
            "label": np.where(digits.labels[:200] == 8, "eight", "other").tolist(),
        }
    )
    with db.session_scope(engine) as session:
        project = create_project(
            session,
            ProjectSpec(
                name="alpha",
                labels=["other", "eight"],
                modality="features",
                store_url=f"file://{folder / 'store'}",
                batch_size=20,
                retrain_min_new_labels=20,
            ),
        )
        add_to_pool(
            session,
            get_project(session, project.name),
            str(folder / "sources" / "pool.npz"),
            settings=settings,
            trusted_roots=settings.source_roots,
        )
        set_simulated_labeler(session, "alpha", truth, settings, annotator="sim")
    # Two cycles, so cycle 1..2, model 1 and dataset version 1 exist for the generated ids.
    for _ in range(2):
        cycle = maybe_start_cycle(engine, "alpha", settings)
        assert cycle is not None
        run_cycle(engine, cycle.id or 0, settings)
    record_heartbeat(engine, "schemathesis@host", QUEUES, 1)
    app = create_app(settings, engine=engine)
    app.state.test_engine = engine
    yield app
    engine.dispose()
    broker.kill()


def admin_headers(app: FastAPI, path: str) -> dict[str, str]:
    """A fresh admin token per case: a generated DELETE /tokens/{id} may revoke earlier ones.
    Label Studio's model backend routes take it as basic auth's password."""
    with db.session_scope(app.state.test_engine) as session:
        _, secret = create_token(session, name="schemathesis", scope="admin", actor="test")
    if "/label-studio-backend/" in path:
        return {"Authorization": "Basic " + base64.b64encode(f"ls:{secret}".encode()).decode()}
    return {"Authorization": f"Bearer {secret}"}


def test_every_operation_honours_the_schema_and_reaches_its_handler(
    app_under_test: FastAPI,
) -> None:
    # Each operation is driven by Hypothesis here rather than by `schema.parametrize()`, whose
    # fixture-loaded form does not run under pytest 9.
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", app_under_test, config=SchemathesisConfig.from_dict(CONFIG)
    )
    statuses: Counter[int] = Counter()
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    for operation in operations:
        # Project routes act on the project this module made (random names only meet 404s).
        fixed = {"project": "alpha"} if "{project}" in operation.path else None

        @given(case=operation.as_strategy(path_parameters=fixed))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def exercise(case: schemathesis.Case[Any]) -> None:
            headers = {
                **admin_headers(app_under_test, case.operation.path),
                "X-Focalloop-Secret": WEBHOOK_SECRET,
            }
            response = case.call_and_validate(headers=headers)
            statuses[response.status_code] += 1

        try:
            exercise()
        except (Exception, BaseExceptionGroup) as error:  # every operation's failure is shown
            failures[operation.label] = f"{type(error).__name__}: {error!r} {error}"[:3000]
    assert failures == {}, "\n\n".join(f"{k}: {v}" for k, v in failures.items())
    print(f"schemathesis: {len(operations)} operations, statuses {dict(statuses)}")
    total = sum(statuses.values())
    assert total >= EXAMPLES_PER_OPERATION * len(operations) // 2, statuses
    assert (statuses[401] + statuses[403]) / total < 0.05, statuses
    assert not [status for status in statuses if status >= 500], statuses
