import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.config import Settings, child_environment


def test_settings_read_the_focalloop_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOCALLOOP_DEVICE", "cpu")
    monkeypatch.setenv("FOCALLOOP_TORCH_THREADS", "3")
    settings = Settings()
    assert settings.device == "cpu" and settings.torch_threads == 3


def test_unknown_and_invalid_settings_are_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(devcie="cpu")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        Settings(device="tpu")  # type: ignore[arg-type]


def test_child_environment_carries_exactly_these_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FOCALLOOP_BROKER_URL", "redis://stray-broker:6379/0")
    settings = Settings(
        data_dir=tmp_path,
        broker_url="redis://127.0.0.1:6400/0",
        source_roots=["file:///data/in", "s3://bucket/raw"],
        s3_secret_access_key="secret",  # type: ignore[arg-type]
        lease_s=3.0,
    )
    environment = child_environment(settings, FOCALLOOP_MAX_CHUNK_ATTEMPTS="5")
    for key in [k for k in os.environ if k.startswith("FOCALLOOP_")]:
        monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    rebuilt = Settings(_env_file=None)  # type: ignore[call-arg]
    assert rebuilt == settings.model_copy(update={"max_chunk_attempts": 5})


def test_label_studio_origins_are_origins_and_never_a_wildcard() -> None:
    settings = Settings(label_studio_origins=["HTTP://Annotate.Example.com:80/", "https://x:8443"])
    assert settings.label_studio_origins == ["http://annotate.example.com", "https://x:8443"]
    for bad in ["*", "http://x/path", "ftp://x", "http://user@x", "http://x:99999"]:
        with pytest.raises(ValidationError):
            Settings(label_studio_origins=[bad])
