"""The status and steering API over a real database and broker: a project created, filled and
cycled through the API, then every read checked against the database (metrics included)."""

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import sqlalchemy as sa
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import col, func, select

from labeling.simulated import set_simulated_labeler
from services import db
from services.api.app import create_app
from services.config import Settings
from services.cycle.trigger import maybe_start_cycle
from services.ml.checkpoint import load_checkpoint
from services.ml.score import score
from services.models import Annotation, Cycle, Item, ItemStatus, ModelVersion, ScoreChunk
from services.projects import get_project
from services.status import HUMAN_SOURCES, headline_report
from tests.conftest import Digits
from tests.integration.api_harness import Api
from tests.integration.conftest import PrivateRedis, unique_name
from tests.integration.cycle_helpers import run_stages

pytestmark = pytest.mark.slow


@pytest.fixture
def api_settings(settings: Settings, private_redis: PrivateRedis, tmp_path: Path) -> Settings:
    (tmp_path / "sources").mkdir()
    return settings.model_copy(
        update={
            "broker_url": private_redis.url,
            "source_roots": [f"file://{tmp_path / 'sources'}"],
            "pool_shard_items": 200,
            "lease_s": 30.0,
        }
    )


@pytest.fixture
def api(engine: sa.Engine, api_settings: Settings) -> Iterator[Api]:
    with TestClient(create_app(api_settings, engine=engine)) as client:
        yield Api(client, engine)


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_project_is_run_and_watched_through_the_api(
    api: Api, api_settings: Settings, private_redis: PrivateRedis, digits: Digits, tmp_path: Path
) -> None:
    client, write, read = api.client, api.headers("write"), api.headers("read")
    name = unique_name("api")
    answer = client.post(
        "/api/v1/projects",
        headers=write,
        json={
            "name": name,
            "labels": ["other", "eight"],
            "modality": "features",
            "batch_size": 20,
            "retrain_min_new_labels": 20,
            "gate": {"eval_fraction": 0.05, "alert_after_rejections": 2},
            # Seed 1: the first cycle's k-means picks include an eight, so the second cycle
            # has two classes to train on (seed 0's ten picks hold none).
            "seed": 1,
        },
    )
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert created["seed"] == 1
    assert created["store_url"] == f"file://{(tmp_path / 'data').resolve()}/stores/{name}"
    assert (
        client.post("/api/v1/projects", headers=write, json={**created, "name": name}).status_code
        == 422
    )
    again = client.post(
        "/api/v1/projects",
        headers=write,
        json={"name": name, "labels": ["a", "b"], "modality": "features"},
    )
    assert (again.status_code, again.json()["detail"]) == (409, f"project {name!r} already exists")

    ids = np.array([f"d{i:04d}" for i in range(400)])
    np.savez(tmp_path / "sources" / "pool.npz", features=digits.features[:400], item_ids=ids)
    outside = client.post(
        f"/api/v1/projects/{name}/pool", headers=write, json={"source": "/etc/passwd"}
    )
    assert outside.status_code == 422
    assert "outside the trusted source roots" in outside.json()["detail"]
    added = client.post(
        f"/api/v1/projects/{name}/pool",
        headers=write,
        json={"source": f"file://{tmp_path / 'sources' / 'pool.npz'}"},
    )
    assert added.status_code == 200, added.text
    assert (added.json()["added"], added.json()["duplicates"]) == (400, 0)
    truth = np.where(digits.labels[:400] == 8, "eight", "other")
    with db.session_scope(api.engine) as session:
        import pyarrow as pa

        set_simulated_labeler(
            session,
            name,
            pa.table({"item_id": ids.tolist(), "label": truth.tolist()}),
            api_settings,
            annotator="sim",
        )

    # Starting a cycle commits it and sends its training to the gpu queue of the real broker.
    started = client.post(f"/api/v1/projects/{name}/cycles", headers=write)
    assert started.status_code == 202, started.text
    first = started.json()["id"]
    assert started.json()["state"] == "pending"
    raw = redis.Redis.from_url(private_redis.url).lpop("gpu")
    assert isinstance(raw, bytes)
    message = json.loads(raw)
    assert (message["headers"]["task"], message["headers"]["argsrepr"]) == (
        "focalloop.train",
        f"[{first}]",
    )
    busy = client.post(f"/api/v1/projects/{name}/cycles", headers=write)
    assert busy.status_code == 409
    run_stages(api.engine, first, api_settings)
    second = maybe_start_cycle(api.engine, name, api_settings)
    assert second is not None
    run_stages(api.engine, second.id or 0, api_settings)

    listed = client.get(f"/api/v1/projects/{name}/cycles", headers=read).json()
    assert [c["id"] for c in listed] == [second.id, first]
    with db.session_scope(api.engine) as session:
        scored = session.exec(
            select(func.sum(ScoreChunk.items_scored)).where(ScoreChunk.cycle_id == second.id)
        ).one()
        row = session.get(Cycle, second.id)
        assert row is not None
        timeline = row.timeline
    latest = listed[0]
    assert (latest["state"], latest["items_scored"], latest["model_version"]) == ("done", scored, 1)
    assert list(latest["durations_s"]) == [e["state"] for e in timeline[:-1]]
    assert latest["duration_s"] > 0 and latest["scoring_items_per_s"] > 0
    one = client.get(f"/api/v1/projects/{name}/cycles/{first}", headers=read).json()
    # A cold start asks for no evaluation label: there is no model yet for it to judge.
    assert (one["cold_start_picks"], one["selected_count"]) == (20, 20)
    assert client.get(f"/api/v1/projects/{name}/cycles/999999", headers=read).status_code == 404

    models = client.get(f"/api/v1/projects/{name}/models", headers=read).json()
    assert [m["version"] for m in models] == [1]
    model = models[0]
    with db.session_scope(api.engine) as session:
        stored = session.exec(select(ModelVersion).where(ModelVersion.cycle_id == second.id)).one()
        which, report = headline_report(stored.metrics)
    # The first model: no evaluation item was labeled before it (a cold start asks for none)
    # and 40 labels hold no validation split, so it has no held-out figures, and says so.
    assert (which, report) == (None, None)
    assert model["promotion"] == "current"
    assert model["promotion_reason"] == stored.promotion_reason
    assert str(stored.promotion_reason).startswith("promoted: first model (no evaluation items")
    assert model["summary"] is None
    assert model["lineage"] == [1]
    assert len(model["training_curve"]["train_loss"]) == len(stored.metrics["train_loss"])

    archive = client.get(f"/api/v1/projects/{name}/models/1/checkpoint", headers=read)
    assert archive.headers["content-type"] == "application/zip"
    folder = tmp_path / "downloaded"
    zipfile.ZipFile(io.BytesIO(archive.content)).extractall(folder)
    checkpoint = load_checkpoint(folder)
    expected = score(
        checkpoint.model,
        digits.features[:3],
        spec=checkpoint.spec,
        temperature=checkpoint.temperature,
        device="cpu",
    ).probs

    by_items = client.post(
        f"/api/v1/projects/{name}/predict",
        headers=read,
        json={"item_ids": ["d0000", "d0001", "d0002"]},
    ).json()
    by_rows = client.post(
        f"/api/v1/projects/{name}/predict",
        headers=read,
        json={"features": digits.features[:3].tolist()},
    ).json()
    for answer_ in (by_items, by_rows):
        assert answer_["model_version"] == 1
        got = np.array(
            [
                [p["probabilities"]["other"], p["probabilities"]["eight"]]
                for p in answer_["predictions"]
            ]
        )
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert [p["item_id"] for p in by_items["predictions"]] == ["d0000", "d0001", "d0002"]
    wrong_width = client.post(
        f"/api/v1/projects/{name}/predict", headers=read, json={"features": [[0.0, 1.0]]}
    )
    assert (wrong_width.status_code, wrong_width.json()["detail"]) == (
        422,
        "each feature row needs 64 values (the pool's width)",
    )
    unknown_item = client.post(
        f"/api/v1/projects/{name}/predict", headers=read, json={"item_ids": ["nope"]}
    )
    assert unknown_item.status_code == 404

    versions = client.get(f"/api/v1/projects/{name}/datasets", headers=read).json()
    assert [v["version"] for v in versions] == [1]
    exported = client.get(
        f"/api/v1/projects/{name}/datasets/1/export", params={"format": "csv"}, headers=read
    )
    assert exported.text.count("\n") == versions[0]["row_count"] + 1  # header + rows
    assert client.get(f"/api/v1/projects/{name}/datasets/1/lineage", headers=read).json() == [1]
    diff = client.get(
        f"/api/v1/projects/{name}/datasets/1/diff", params={"against": 1}, headers=read
    ).json()
    assert (diff["added"], diff["withdrawn"], diff["relabeled"]) == ([], [], [])

    queue = client.get(f"/api/v1/projects/{name}/queue", headers=read).json()
    with db.session_scope(api.engine) as session:
        project = get_project(session, name)
        labeled_now = session.exec(
            select(func.count())
            .select_from(Item)
            .where(Item.project_id == project.id, Item.status == ItemStatus.LABELED)
        ).one()
    assert queue["annotators"] == [
        {"annotator": "sim", "last_24h": labeled_now, "last_7d": labeled_now, "total": labeled_now}
    ]
    assert queue["labels_since_last_version"] == 20  # cycle 2's answers, after v1
    assert (queue["queued"], queue["selected"], queue["reviews_pending"]) == (0, 0, 0)

    item = client.get(f"/api/v1/projects/{name}/items/d0000", headers=read).json()
    assert item["external_id"] == "d0000"
    assert all(entry["annotator"] == "sim" for entry in item["history"])

    # The exported metrics are the database's values.
    text = client.get("/metrics").text
    values = metric_values(text)
    with db.session_scope(api.engine) as session:
        project = get_project(session, name)
        states = dict(
            session.execute(
                sa.select(col(Cycle.state), func.count())
                .where(col(Cycle.project_id) == project.id)
                .group_by(col(Cycle.state))
            ).all()
        )
        total_scored = session.exec(
            select(func.sum(ScoreChunk.items_scored))
            .join(Cycle, col(Cycle.id) == col(ScoreChunk.cycle_id))
            .where(Cycle.project_id == project.id)
        ).one()
        labels_total = session.exec(
            select(func.count())
            .select_from(Annotation)
            .where(
                Annotation.project_id == project.id,
                col(Annotation.source).in_(HUMAN_SOURCES),
                col(Annotation.cancelled).is_(False),
            )
        ).one()
    me = (("project", name),)
    assert (
        values[("focalloop_cycles", (("project", name), ("state", "done")))] == states["done"] == 2
    )
    assert values[("focalloop_items_scored_total", me)] == total_scored
    assert values[("focalloop_labels_total", me)] == labels_total
    assert values[("focalloop_queue_depth", me)] == 0
    assert values[("focalloop_model_version", me)] == 1
    # Without held-out figures the model's recall and hard-example rate are absent, not 0.0.
    assert not any(
        series in ("focalloop_model_recall", "focalloop_model_hard_example_rate")
        and dict(labels).get("project") == name
        for series, labels in values
    )
    assert values[("focalloop_cycle_duration_seconds_count", me)] == 2
    assert values[("focalloop_items_scored_per_second", me)] == pytest.approx(
        latest["scoring_items_per_s"]
    )

    # Steering is audited with the token that did it.
    client.post(f"/api/v1/projects/{name}/pause", headers=write)
    paused = client.post(f"/api/v1/projects/{name}/cycles", headers=write)
    assert (paused.status_code, paused.json()["detail"]) == (
        422,
        f"project {name!r} is paused; resume it to start cycles",
    )
    assert (
        client.post(f"/api/v1/projects/{name}/models/1/rollback", headers=write).status_code == 409
    )
    audit = client.get("/api/v1/audit", params={"project": name}, headers=read).json()
    assert [e["action"] for e in audit] == [
        "project.pause",
        "cycle.start",
        "pool.add",
        "project.create",
    ]
    assert {e["actor"].rsplit(":", 1)[0] for e in audit} == {f"token:{_token_id(api, write)}"}


def _token_id(api: Api, headers: dict[str, str]) -> int:
    from services.auth import authenticate

    with db.session_scope(api.engine) as session:
        principal = authenticate(session, headers["Authorization"].split(" ", 1)[1])
        assert principal is not None
        return principal.token_id
