"""The local Label Studio's admin credentials: random per data directory, kept 0600, stable
across starts; a data directory made before (with the published ones) keeps those. Commands run
beside `focalloop up` find its token and webhook secret in the data directory."""

from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import SecretStr

from labeling.label_studio.link import (
    KEPT_WEBHOOK_SECRET,
    LabelStudioLink,
    gateway,
    webhook_secret,
)
from labeling.label_studio.server import (
    CREDENTIALS_FILE,
    LEGACY_CREDENTIALS,
    UP_LABEL_STUDIO_DIR,
    Credentials,
    kept_token,
    local_credentials,
)
from services.config import Settings
from services.errors import InvalidInput


def test_credentials_are_random_private_and_stable(tmp_path: Path) -> None:
    first = local_credentials(tmp_path / "a")
    assert first == local_credentials(tmp_path / "a")  # the same data directory, again
    assert first != local_credentials(tmp_path / "b")
    assert first.password != LEGACY_CREDENTIALS.password
    assert len(first.token) == 40 and first.token != LEGACY_CREDENTIALS.token
    assert (tmp_path / "a" / CREDENTIALS_FILE).stat().st_mode & 0o777 == 0o600


def test_a_data_directory_from_before_keeps_its_credentials(tmp_path: Path) -> None:
    (tmp_path / "label_studio.sqlite3").write_bytes(b"")  # Label Studio already ran here
    assert local_credentials(tmp_path) == LEGACY_CREDENTIALS
    assert not (tmp_path / CREDENTIALS_FILE).exists()
    assert Credentials.load_or_create(tmp_path / "x.json") != LEGACY_CREDENTIALS


def test_commands_beside_up_find_its_token_and_webhook_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, `labelstudio sync` next to `up` failed: "LABEL_STUDIO_TOKEN is not set".
    monkeypatch.delenv("LABEL_STUDIO_TOKEN", raising=False)
    settings = Settings(data_dir=tmp_path, webhook_secret=None)
    link = LabelStudioLink(
        url="http://127.0.0.1:8080",
        token_env="LABEL_STUDIO_TOKEN",
        project_id=1,
        webhook_id=1,
        view_id=1,
        media="auto",
    )
    with pytest.raises(InvalidInput, match="LABEL_STUDIO_TOKEN is not set"):
        gateway(link, settings)
    with pytest.raises(InvalidInput, match="FOCALLOOP_WEBHOOK_SECRET"):
        webhook_secret(settings)
    kept = local_credentials(tmp_path / UP_LABEL_STUDIO_DIR)  # what `up` makes
    (tmp_path / KEPT_WEBHOOK_SECRET).write_text("kept-secret\n")
    assert kept_token(tmp_path) == kept.token
    assert gateway(link, settings)._token == kept.token
    assert webhook_secret(settings) == "kept-secret"
    # The local admin token never goes to another server, nor under another variable's name.
    for elsewhere in (
        replace(link, url="https://labels.example.com"),
        replace(link, token_env="PROD_TOKEN"),
    ):
        with pytest.raises(InvalidInput, match="is not set"):
            gateway(elsewhere, settings)
    # Variables, when set, still win.
    monkeypatch.setenv("LABEL_STUDIO_TOKEN", "from-the-environment")
    assert gateway(link, settings)._token == "from-the-environment"
    assert webhook_secret(settings.model_copy(update={"webhook_secret": SecretStr("s")})) == "s"
