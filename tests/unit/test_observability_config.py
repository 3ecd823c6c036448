"""Monitoring and deployment configuration, checked without Docker: Prometheus' scrape and
alert rules, Grafana's provisioning and dashboard, and .env.example, against what the code
really exports and reads."""

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services import db
from services.api.metrics import metrics_registry
from services.config import Settings

ROOT = Path(__file__).resolve().parents[2]
METRIC = re.compile(r"\bfocalloop_[a-z0-9_]+")


def load_yaml(relative: str) -> Any:
    return yaml.safe_load((ROOT / relative).read_text())


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every sample name /metrics can carry (families collected from a real, empty database)."""
    engine = db.make_engine(f"sqlite:///{tmp_path_factory.mktemp('metrics') / 'state.db'}")
    db.upgrade(engine)
    registry, _ = metrics_registry(engine)
    names: set[str] = set()
    for family in registry.collect():
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
        }.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    engine.dispose()
    return names


def test_every_metric_the_alert_rules_query_is_exported(exported: set[str]) -> None:
    rules = load_yaml("infra/prometheus/alerts.yml")["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} == {
        "FocalloopClassRecallBelowTarget",
        "FocalloopHardExampleRateSpike",
        "FocalloopGateRejectingEveryModel",
        "FocalloopCyclesFailing",
        "FocalloopWebhookRejections",
        "FocalloopNoLabelsForADay",
    }
    for rule in rules:
        used = set(METRIC.findall(rule["expr"]))
        assert used, rule["alert"]
        assert used <= exported, f"{rule['alert']} queries {sorted(used - exported)}"


def test_every_metric_the_dashboard_queries_is_exported(exported: set[str]) -> None:
    dashboard = json.loads((ROOT / "infra/grafana/dashboards/focalloop.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    expressions += [v["query"] for v in dashboard["templating"]["list"]]
    used = {name for expr in expressions for name in METRIC.findall(expr)}
    assert used <= exported, sorted(used - exported)
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("recall", "hard-example rate", "queue depth", "cycle duration"):
        assert topic in titles
    datasource = load_yaml("infra/grafana/provisioning/datasources/prometheus.yml")
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    assert uids == {datasource["datasources"][0]["uid"]}


def test_prometheus_scrapes_the_api_and_loads_the_mounted_rules() -> None:
    config = load_yaml("infra/prometheus/prometheus.yml")
    job = config["scrape_configs"][0]
    assert (job["metrics_path"], job["static_configs"][0]["targets"]) == ("/metrics", ["api:8000"])
    compose = load_yaml("docker-compose.yml")["services"]
    mounts = {
        volume.split(":")[1]: volume.split(":")[0] for volume in compose["prometheus"]["volumes"]
    }
    for rule_file in config["rule_files"]:
        assert (ROOT / mounts[rule_file]).is_file()
    grafana_mounts = [v.split(":")[0] for v in compose["grafana"]["volumes"] if v.startswith("./")]
    for source in grafana_mounts:
        assert (ROOT / source).exists(), source


def test_env_example_names_only_real_settings_and_loads(tmp_path: Path) -> None:
    text = (ROOT / ".env.example").read_text()
    keys = set(re.findall(r"^#?\s*(FOCALLOOP_[A-Z0-9_]+)=", text, flags=re.MULTILINE))
    assert keys >= {"FOCALLOOP_WEBHOOK_SECRET", "FOCALLOOP_LOG_FORMAT"}
    assert keys <= {f"FOCALLOOP_{name.upper()}" for name in Settings.model_fields}
    # Copied to .env as is, it is a valid settings file (compose's own keys are passed over).
    settings = Settings(_env_file=ROOT / ".env.example")  # type: ignore[call-arg]
    assert settings.webhook_secret is not None
    typo = tmp_path / ".env"
    typo.write_text(text + "FOCALLOOP_WEBHOK_SECRET=x\n")
    with pytest.raises(ValueError, match="webhok_secret"):
        Settings(_env_file=typo)  # type: ignore[call-arg]


def test_the_compose_file_references_the_env_example_keys() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for key in ("FOCALLOOP_WEBHOOK_SECRET", "LABEL_STUDIO_TOKEN", "GRAFANA_ADMIN_PASSWORD"):
        assert "${" + key in text
        assert re.search(rf"^{key}=", (ROOT / ".env.example").read_text(), flags=re.MULTILINE)
