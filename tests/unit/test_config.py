import pytest
from pydantic import ValidationError

from services.config import Settings


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
