"""The local Label Studio's admin credentials: random per data directory, kept 0600, stable
across starts; a data directory made before (with the published ones) keeps those."""

from pathlib import Path

from labeling.label_studio.server import (
    CREDENTIALS_FILE,
    LEGACY_CREDENTIALS,
    Credentials,
    local_credentials,
)


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
