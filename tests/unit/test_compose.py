"""docker-compose.yml, checked as far as this machine allows (no Docker engine here): it parses,
services reference what exists, and every FOCALLOOP_* key is a real setting."""

from pathlib import Path
from typing import Any

import yaml

from services.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_parses_and_dependencies_exist() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "minio", "minio-init"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"


def test_image_links_point_where_a_browser_can_reach_them() -> None:
    # Label Studio shows images from the annotator's browser, which cannot resolve the
    # services' names on the compose network: links use the published ports.
    services = compose()["services"]
    environment = services["api"]["environment"]
    assert environment["FOCALLOOP_API_URL"] == "http://api:8000"  # Label Studio -> API
    assert environment["FOCALLOOP_MEDIA_BASE_URL"] == "http://localhost:8000"
    assert "8000:8000" in services["api"]["ports"]
    assert environment["FOCALLOOP_S3_PUBLIC_ENDPOINT_URL"] == "http://localhost:9000"
    assert "9000:9000" in services["minio"]["ports"]


def test_redis_keeps_queued_tasks() -> None:
    command = compose()["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_focalloops_long_running_processes_come_back_when_they_die() -> None:
    services = compose()["services"]
    long_running = [
        name
        for name, service in services.items()
        if service.get("command", [""])[0] == "focalloop" and service["command"][1] != "db"
    ]
    assert set(long_running) == {"worker-gpu", "worker-io", "beat", "api"}
    assert all(services[name].get("restart") == "unless-stopped" for name in long_running)


def test_minio_init_uses_minios_credentials_and_enables_versioning() -> None:
    services = compose()["services"]
    env = services["minio"]["environment"]
    script = services["minio-init"]["command"][0]
    assert f"{env['MINIO_ROOT_USER']} {env['MINIO_ROOT_PASSWORD']}" in script
    assert "mc version enable local/focalloop-data" in script


def test_every_focalloop_environment_key_is_a_setting() -> None:
    fields = {f"FOCALLOOP_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose()["services"].items():
        environment = service.get("environment", {})
        keys = (
            environment if isinstance(environment, dict) else [e.split("=")[0] for e in environment]
        )
        unknown = {key for key in keys if key.startswith("FOCALLOOP_")} - fields
        assert not unknown, f"{name}: {sorted(unknown)} are not focalloop settings"


def _parse_cli(args: list[str]) -> None:
    """Parse `focalloop ARGS --help`: the command must exist and every option before --help
    must be one it takes (the parser rejects unknown ones before it reaches the eager --help),
    so a misspelled command or option in the compose file fails here without running it."""
    from typer.testing import CliRunner

    from services.cli import app

    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, f"focalloop {' '.join(args)}: {result.output}"
    assert "Usage:" in result.output


def test_every_focalloop_command_in_compose_exists_with_its_options() -> None:
    commands = [
        service["command"]
        for service in compose()["services"].values()
        if isinstance(service.get("command"), list) and service["command"][0] == "focalloop"
    ]
    assert len(commands) >= 4
    for command in commands:
        _parse_cli(command[1:])


def test_the_gpu_worker_reserves_a_gpu_and_serves_only_the_gpu_queue() -> None:
    worker = compose()["services"]["worker-gpu"]
    assert worker["command"][worker["command"].index("--queues") + 1] == "gpu"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_dockerfile_installs_the_project_and_its_migrations() -> None:
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    for needed in ("COPY services", "COPY workers", "COPY infra/migrations", "pip install -e ."):
        assert needed in dockerfile


def test_label_studio_waits_long_enough_for_a_webhook_answer() -> None:
    # Label Studio's default is 1 s with no retry: a busy api lost events until reconciliation.
    environment = compose()["services"]["label-studio"]["environment"]
    assert float(environment["WEBHOOK_TIMEOUT"]) >= 5
    # The api's model backend is on the private network Label Studio refuses by default.
    assert environment["ML_BLOCK_LOCAL_IP"] == "false"
