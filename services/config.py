"""Settings: the only place in focalloop that reads the environment.

Built once per process by `get_settings()` and passed down; nothing below the edges calls it.
Every field maps to an environment variable `FOCALLOOP_<FIELD>`; unknown `FOCALLOOP_*` keys in a
`.env` file are refused, so a typo cannot silently fall back to a default.
"""

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)


class _FocalloopDotEnv(DotEnvSettingsSource):
    """The `.env` file's FOCALLOOP_* keys only: the file is shared with docker-compose, whose
    own keys (LABEL_STUDIO_TOKEN, GRAFANA_ADMIN_PASSWORD) are not settings. An unknown
    FOCALLOOP_* key is still refused."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        prefix = self._apply_case_sensitive(self.env_prefix)
        return {k: v for k, v in super()._load_env_vars().items() if k.startswith(prefix)}


class Settings(BaseSettings):
    """Process-wide configuration (env prefix `FOCALLOOP_`)."""

    model_config = SettingsConfigDict(
        env_prefix="FOCALLOOP_", env_file=".env", extra="forbid", frozen=True
    )

    data_dir: Path = Field(
        default=Path("~/.local/share/focalloop"),
        description="Root of the embedded defaults (SQLite file, local dataset store).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where training and scoring run; auto = CUDA when present."
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for torch; None keeps torch's default."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="Logs of the api, worker and beat: JSON lines with project/cycle/task ids, "
        "or plain text for a terminal.",
    )
    access_log: bool = Field(
        default=False,
        description="One log line per API request (query values redacted: tokens and media "
        "signatures travel there).",
    )
    database_url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the state database; None = a SQLite file under data_dir. "
            "PostgreSQL: postgresql+psycopg://user:pass@host:5432/db."
        ),
    )
    sqlite_busy_timeout_ms: int = Field(
        default=15_000,
        ge=0,
        description="How long a SQLite writer waits for another process's lock before failing.",
    )
    source_roots: list[str] = Field(
        default_factory=list,
        description=(
            "URL prefixes (file:///dir/ or s3://bucket/prefix/) pool sources may be read from. "
            "The CLI also trusts the source it is given; the API trusts only these."
        ),
    )
    store_roots: list[str] = Field(
        default_factory=list,
        description=(
            "URL prefixes (file:///dir/ or s3://bucket/prefix/) where projects created through "
            "the API may keep their dataset store; the default store, a folder under data_dir, "
            "is always allowed."
        ),
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO); None = boto3's own (AWS_ENDPOINT_URL_S3).",
    )
    s3_public_endpoint_url: str | None = Field(
        default=None,
        description="The S3 endpoint as annotators' browsers reach it, which presigned image "
        "links are signed for (MinIO on a private network behind a published port); None = "
        "s3_endpoint_url.",
    )
    s3_region: str | None = Field(default=None, description="None = boto3's own default.")
    s3_access_key_id: str | None = Field(default=None, description="None = boto3's chain.")
    s3_secret_access_key: SecretStr | None = Field(default=None, description="None = boto3's.")
    pool_shard_items: int = Field(
        default=4096,
        ge=1,
        description="Items per columnar pool shard; a scoring chunk reads whole shards.",
    )

    broker_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Celery broker (Redis) URL."
    )
    visibility_timeout_s: int = Field(
        default=4 * 3600,
        ge=1,
        description=(
            "Seconds Redis waits before redelivering an unacknowledged task; must exceed the "
            "longest task (training)."
        ),
    )
    lease_s: float = Field(
        default=120.0,
        gt=0,
        description="A running chunk's or training's lease; renewed while it works.",
    )
    max_chunk_attempts: int = Field(default=3, ge=1, description="Then the chunk fails.")
    max_train_attempts: int = Field(default=3, ge=1, description="Then the cycle fails.")
    cycle_deadline_s: float = Field(
        default=12 * 3600, gt=0, description="A cycle still running after this fails."
    )
    heartbeat_stale_s: float = Field(
        default=30.0,
        gt=0,
        description="/ready calls a queue unserved when no worker consuming it wrote a "
        "heartbeat for this long (workers write one every 5 s).",
    )
    recover_interval_s: float = Field(
        default=30.0, gt=0, description="How often beat runs recover_stalled."
    )
    schedule_interval_s: float = Field(
        default=60.0, gt=0, description="How often beat runs maybe_start_cycle per project."
    )
    start_due_cycles_at_once: bool = Field(
        default=True,
        description="Start a due cycle at once: after an ingest took in people's answers, and "
        "when a worker starts. Off, only beat's interval starts cycles (`bench annotator` "
        "measures the difference).",
    )

    api_url: str = Field(
        default="http://127.0.0.1:8000",
        description=(
            "Where the labeling tool reaches our API (webhooks, media links): the URL as seen "
            "from the Label Studio server, without a trailing /api."
        ),
    )
    media_base_url: str | None = Field(
        default=None,
        description="Where annotators' browsers reach our API, for the image links tasks "
        "carry (Label Studio shows them from the browser); None = api_url, right when Label "
        "Studio and the browsers reach the API at one address.",
    )
    label_studio_origins: list[str] = Field(
        default_factory=list,
        description=(
            "Origins (scheme://host[:port]) whose pages may load our image links, besides the "
            "URL each connected project's Label Studio was connected with: the address "
            "annotators' browsers use when it differs (a proxy, a published port). Never '*'."
        ),
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description=(
            "Shared secret Label Studio sends in the X-Focalloop-Secret header; unset = every "
            "webhook is refused."
        ),
    )
    api_max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Larger REST request bodies are refused with 413 before they are parsed.",
    )
    predict_max_body_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="The same for predict, whose 1,000 feature rows may be wide.",
    )
    webhook_max_body_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Larger webhook bodies are refused with 413 (Label Studio's carry the task).",
    )
    media_url_ttl_s: int = Field(
        default=24 * 3600,
        ge=60,
        le=7 * 24 * 3600,
        description="Lifetime of the image links tasks carry (at most 7 days, S3's presigning "
        "limit); reconciliation renews an open task's link before half of it is left.",
    )
    label_studio_timeout_s: float = Field(
        default=60.0, gt=0, description="Per request to Label Studio."
    )
    label_studio_sync_interval_s: float = Field(
        default=300.0,
        gt=0,
        description="How often beat reconciles every project with its labeling tool (Label "
        "Studio: push pending tasks, take in what webhooks missed). The name predates other "
        "labelers and is kept so existing configurations go on working.",
    )
    label_studio_import_batch: int = Field(
        default=500, ge=1, le=10_000, description="Tasks per import request."
    )

    gpu_queue_concurrency: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Pool processes of a worker serving the gpu queue on a host without a GPU (or with "
            "FOCALLOOP_DEVICE=cpu); None = one per CPU core. With GPUs it is one per GPU."
        ),
    )

    debug_chunk_delay_s: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Fault drills only: seconds score_chunk waits between writing its results and "
            "marking the chunk done, so a kill can land mid-task. Keep 0 in production."
        ),
    )

    @field_validator("label_studio_origins")
    @classmethod
    def _origins_only(cls, origins: list[str]) -> list[str]:
        return [web_origin(origin, strict=True) for origin in origins]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        assert isinstance(dotenv_settings, DotEnvSettingsSource)
        dotenv = _FocalloopDotEnv(
            settings_cls,
            env_file=dotenv_settings.env_file,  # as given to Settings(_env_file=...) or the default
            env_file_encoding=dotenv_settings.env_file_encoding,
        )
        return (init_settings, env_settings, dotenv, file_secret_settings)

    def resolved_database_url(self) -> str:
        """The database URL, with the embedded SQLite default under data_dir."""
        if self.database_url:
            return self.database_url
        path = self.data_dir.expanduser() / "focalloop.db"
        return f"sqlite:///{path}"


def web_origin(url: str, *, strict: bool = False) -> str:
    """The origin (scheme://host[:port], lower case, default port dropped) of an http(s) URL, as
    a browser sends it in its Origin header. strict: `url` must be an origin already (no path,
    query or credentials); ValueError otherwise, naming what is wrong."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) origin such as http://127.0.0.1:8080")
    if strict and (parts.path not in ("", "/") or parts.query or parts.fragment or parts.username):
        raise ValueError(f"{url!r} is not an origin: no path, query or user allowed")
    default_port = {"http": 80, "https": 443}[parts.scheme]
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} has a bad port") from None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    suffix = f":{port}" if port is not None and port != default_port else ""
    return f"{parts.scheme}://{host}{suffix}"


def secret_from_environment(variable: str) -> SecretStr:
    """A secret named by the user (e.g. `--token-env LABEL_STUDIO_TOKEN`), read from this
    process's environment. Raises KeyError naming the variable when it is unset or empty."""
    value = os.environ.get(variable, "")
    if not value:
        raise KeyError(f"environment variable {variable} is not set")
    return SecretStr(value)


def redis_url_from_environment() -> str | None:
    """REDIS_URL, the conventional name a platform gives its Redis; `focalloop up` uses it as
    the broker instead of starting its own redis-server. None when unset or empty."""
    return os.environ.get("REDIS_URL") or None


def visible_gpu_setting() -> str | None:
    """CUDA_VISIBLE_DEVICES as the environment gives it (None when unset)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def pin_visible_gpu(gpu: str) -> None:
    """Make `gpu` the only GPU this process (and what it starts) can see: a gpu worker's pool
    process calls it before CUDA is first used, so "cuda" means its own device."""
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def provide_secret(variable: str, value: str) -> None:
    """Put a secret where `secret_from_environment(variable)` finds it, for this process and
    the processes it starts (a benchmark handing its Label Studio token to the gateway)."""
    os.environ[variable] = value


def process_environment(**extra: str) -> dict[str, str]:
    """This process's environment plus `extra`, for a non-focalloop program it starts (Label
    Studio, redis-server); focalloop processes get `child_environment` instead."""
    return {**os.environ, **extra}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's Settings, read from the environment on first use."""
    return Settings()


def child_environment(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment for a focalloop process this one starts (a benchmark's or a test's
    worker): this process's environment minus every FOCALLOOP_* key, then `settings` written
    back as FOCALLOOP_* variables, then `extra`. Dropping the inherited keys first means the
    child sees exactly these settings, never a stray broker or database from the caller's shell.
    """
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FOCALLOOP_")}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        environment[f"FOCALLOOP_{name.upper()}"] = (
            json.dumps(value) if isinstance(value, list) else str(value)
        )
    environment.update(extra)
    return environment
