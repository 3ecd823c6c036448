"""The DatasetStore contract, held by both backends (a local directory and S3 over HTTP)."""

import pytest

from services.config import Settings
from services.datasets.store import (
    DatasetStore,
    LocalStore,
    S3Store,
    StoreUrl,
    check_segment,
    open_store,
    safe_key,
)
from services.errors import Conflict, InvalidInput, NotFound
from tests.integration.conftest import unique_name


def test_put_get_round_trip_and_listing(store: DatasetStore) -> None:
    assert store.put_if_absent("p/a/one.bin", b"1") is True
    assert store.put_if_absent("p/a/two.bin", b"22") is True
    assert store.put_if_absent("p/b.bin", b"333") is True
    assert store.get("p/a/one.bin") == b"1"
    assert store.exists("p/a/two.bin")
    assert not store.exists("p/a/three.bin")
    assert store.list_keys("p/a/") == ["p/a/one.bin", "p/a/two.bin"]
    assert store.list_keys() == ["p/a/one.bin", "p/a/two.bin", "p/b.bin"]
    assert store.list_keys("nothing/") == []


def test_same_bytes_again_is_a_no_op(store: DatasetStore) -> None:
    assert store.put_if_absent("k/x.json", b"{}") is True
    assert store.put_if_absent("k/x.json", b"{}") is False
    assert store.get("k/x.json") == b"{}"


def test_other_bytes_under_a_taken_key_conflict_and_change_nothing(store: DatasetStore) -> None:
    store.put_if_absent("k/x.json", b"first")
    with pytest.raises(Conflict, match="already exists with other content"):
        store.put_if_absent("k/x.json", b"second")
    assert store.get("k/x.json") == b"first"


def test_missing_object_is_not_found(store: DatasetStore) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        store.get("k/none.bin")


@pytest.mark.parametrize(
    "key",
    ["../escape", "a/../../b", "/abs/key", "a//b", "a/%2e%2e/b", "a\\b", "a/\x00b", ".hidden", ""],
)
def test_traversal_keys_are_refused_and_nothing_is_written(store: DatasetStore, key: str) -> None:
    with pytest.raises(InvalidInput):
        store.put_if_absent(key, b"x")
    assert store.list_keys() == []


@pytest.mark.parametrize("name", ["..", "a/b", "%2e%2e", "a..b", "-x", "x\\y", "é"])
def test_unsafe_segments_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="unsafe"):
        check_segment(name)
    with pytest.raises(InvalidInput):
        safe_key("project", name)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://example.com/x", "only file"),
        ("file://host/dir", "no host"),
        ("file:relative", "absolute"),
        ("file:///a/../b", r"\.\."),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket"),
        ("s3://bucket/a/../b", "unsafe"),
        ("s3://bucket/x?versionId=1", "query"),
        ("file:///tmp/%2e%2e/x", "'%'"),
    ],
)
def test_bad_store_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        StoreUrl.parse(url)


def test_store_urls_round_trip() -> None:
    assert str(StoreUrl.parse("file:///tmp/x/")) == "file:///tmp/x"
    assert str(StoreUrl.parse("s3://bucket/a/b/")) == "s3://bucket/a/b"
    assert str(StoreUrl.parse("s3://bucket")) == "s3://bucket"


def test_local_writes_leave_no_temporary_files(tmp_path: object, settings: Settings) -> None:
    store = open_store(f"file://{tmp_path}/s", settings, create=True)
    assert isinstance(store, LocalStore)
    store.put_if_absent("a/b.bin", b"data")
    store.put_if_absent("a/b.bin", b"data")
    assert sorted(p.name for p in (store.root / "a").iterdir()) == ["b.bin"]


def test_s3_store_creates_its_bucket_with_versioning(settings: Settings) -> None:
    bucket = unique_name("versioned")
    store = open_store(f"s3://{bucket}/prefix", settings, create=True)
    assert isinstance(store, S3Store)
    status = store.client.get_bucket_versioning(Bucket=bucket)["Status"]
    assert status == "Enabled"
    store.put_if_absent("k/a.bin", b"a")
    # Keys live under the URL's prefix in the bucket.
    listed = store.client.list_objects_v2(Bucket=bucket)["Contents"]
    assert [obj["Key"] for obj in listed] == ["prefix/k/a.bin"]


def test_s3_reader_of_a_missing_bucket_sees_an_empty_store(settings: Settings) -> None:
    store = open_store(f"s3://{unique_name('absent')}/x", settings)
    assert store.list_keys() == []
    with pytest.raises(NotFound):
        store.get("k/a.bin")


def test_s3_endpoint_and_credentials_from_boto3s_standard_environment(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No focalloop S3 settings: boto3's own variables (as MinIO deployments set them) reach
    the server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = open_store(f"s3://{unique_name('env')}/p", Settings(), create=True)
    store.put_if_absent("k/v.txt", b"v")
    assert store.get("k/v.txt") == b"v"
