"""Immutable dataset versions on both store backends: commit, read, conflicts, crashes,
corruption, diff and lineage."""

from datetime import UTC, datetime

import pyarrow as pa
import pytest

from services.datasets.store import DatasetStore, LocalStore, S3Store
from services.datasets.versions import (
    ITEMS_SCHEMA,
    commit_version,
    diff_versions,
    latest_version,
    lineage,
    list_versions,
    manifest_key,
    normalize_items,
    read_manifest,
    read_version,
    verify_version,
)
from services.errors import Conflict, CorruptData, InvalidInput, NotFound

LABELS = ["ok", "defect"]
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def items(rows: dict[str, str]) -> pa.Table:
    """An items table from {item_id: label}."""
    ids = list(rows)
    return normalize_items(
        pa.table(
            {
                "item_id": ids,
                "uri": [f"s3://pool/{i}.png" for i in ids],
                "label": [rows[i] for i in ids],
            }
        ),
        labels=LABELS,
        now=T0,
    )


def commit(store: DatasetStore, version: int, rows: dict[str, str], parent: int | None) -> None:
    commit_version(
        store,
        project="proj",
        version=version,
        parent_version=parent,
        items=items(rows),
        labels=LABELS,
        created_at=T0,
        rows_per_object=2,
    )


def overwrite(store: DatasetStore, key: str, data: bytes | None) -> None:
    """Damage the store behind focalloop's back (replace or delete an object)."""
    if isinstance(store, LocalStore):
        path = store.root / key
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
    else:
        assert isinstance(store, S3Store)
        full = f"{store.url.root}/{key}"
        if data is None:
            store.client.delete_object(Bucket=store.bucket, Key=full)
        else:
            store.client.put_object(Bucket=store.bucket, Key=full, Body=data)


def test_commit_and_read_back_exactly(store: DatasetStore) -> None:
    rows = {"a": "ok", "b": "defect", "c": "ok", "d": "ok", "e": "defect"}
    commit(store, 1, rows, None)
    manifest, table = read_version(store, "proj", 1)
    assert table.schema == ITEMS_SCHEMA
    assert dict(zip(table["item_id"].to_pylist(), table["label"].to_pylist(), strict=True)) == rows
    assert manifest.row_count == 5
    assert manifest.class_counts == {"ok": 3, "defect": 2}
    assert manifest.parent_version is None
    assert len(manifest.objects) == 3  # 2 + 2 + 1 rows
    assert all(ref.key.startswith("proj/datasets/objects/") for ref in manifest.objects)
    assert list_versions(store, "proj") == [1]
    assert verify_version(store, "proj", 1).ok


def test_second_writer_of_a_version_gets_conflict_and_nothing_changes(
    store: DatasetStore,
) -> None:
    commit(store, 1, {"a": "ok"}, None)
    before = store.get(manifest_key("proj", 1))
    objects = store.list_keys("proj/datasets/objects/")
    with pytest.raises(Conflict, match="already committed"):
        commit(store, 1, {"a": "defect"}, None)
    assert store.get(manifest_key("proj", 1)) == before
    assert store.list_keys("proj/datasets/objects/") == objects  # the loser left nothing
    assert read_version(store, "proj", 1)[1]["label"].to_pylist() == ["ok"]


def test_identical_retry_of_a_commit_writes_nothing(store: DatasetStore) -> None:
    commit(store, 1, {"a": "ok", "b": "defect"}, None)
    result = commit_version(
        store,
        project="proj",
        version=1,
        parent_version=None,
        items=items({"a": "ok", "b": "defect"}),
        labels=LABELS,
        created_at=T0,
        rows_per_object=2,
    )
    assert result.objects_written == 0
    assert result.manifest_written is False


class ManifestCrashError(Exception):
    pass


class CrashBeforeManifest(DatasetStore):
    """Passes data writes through and dies when the manifest is written."""

    def __init__(self, inner: DatasetStore) -> None:
        self.inner = inner
        self.url = inner.url

    def _create(self, key: str, data: bytes, sha256: str) -> bool:
        if key.endswith("manifest.json"):
            raise ManifestCrashError(key)
        return self.inner._create(key, data, sha256)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list_keys(self, prefix: str = "") -> list[str]:
        return self.inner.list_keys(prefix)

    def check_writable(self) -> None:
        self.inner.check_writable()


def test_crash_between_data_and_manifest_leaves_the_version_invisible_and_a_retry_completes(
    store: DatasetStore,
) -> None:
    commit(store, 1, {"a": "ok"}, None)
    rows = {"a": "ok", "b": "defect", "c": "ok"}
    with pytest.raises(ManifestCrashError):
        commit(CrashBeforeManifest(store), 2, rows, 1)
    assert list_versions(store, "proj") == [1]
    assert latest_version(store, "proj") == 1
    with pytest.raises(NotFound, match="not committed"):
        read_version(store, "proj", 2)
    objects_before = store.list_keys("proj/datasets/objects/")

    result = commit_version(
        store,
        project="proj",
        version=2,
        parent_version=1,
        items=items(rows),
        labels=LABELS,
        created_at=T0,
        rows_per_object=2,
    )
    assert result.objects_written == 0  # the crashed attempt's objects were found in place
    assert result.manifest_written
    assert store.list_keys("proj/datasets/objects/") == objects_before
    assert list_versions(store, "proj") == [1, 2]
    assert read_version(store, "proj", 2)[1].num_rows == 3


def test_corrupted_object_is_detected_by_verify_and_refused_by_readers(
    store: DatasetStore,
) -> None:
    commit(store, 1, {"a": "ok", "b": "defect", "c": "ok"}, None)
    manifest = read_manifest(store, "proj", 1)
    overwrite(store, manifest.objects[0].key, b"PAR1 garbage")
    report = verify_version(store, "proj", 1)
    assert not report.ok
    assert len(report.problems) == 1
    assert "does not match" in report.problems[0]
    with pytest.raises(CorruptData):
        read_version(store, "proj", 1)


def test_missing_object_is_detected_by_verify(store: DatasetStore) -> None:
    commit(store, 1, {"a": "ok", "b": "defect", "c": "ok"}, None)
    manifest = read_manifest(store, "proj", 1)
    overwrite(store, manifest.objects[1].key, None)
    report = verify_version(store, "proj", 1)
    assert [("does not exist" in p) for p in report.problems] == [True]


def test_tampered_manifest_is_refused(store: DatasetStore) -> None:
    commit(store, 1, {"a": "ok"}, None)
    overwrite(store, manifest_key("proj", 1), b'{"format": "x"}')
    assert not verify_version(store, "proj", 1).ok
    with pytest.raises(CorruptData, match="not a valid manifest"):
        read_manifest(store, "proj", 1)


def test_diff_and_lineage_are_exact(store: DatasetStore) -> None:
    commit(store, 1, {"a": "ok", "b": "ok", "c": "defect"}, None)
    commit(store, 2, {"a": "ok", "b": "defect", "d": "ok"}, 1)
    commit(store, 3, {"a": "defect", "b": "defect", "d": "ok", "e": "ok"}, 2)
    result = diff_versions(store, "proj", 1, 2)
    assert result.added == ["d"]
    assert result.withdrawn == ["c"]
    assert [(r.item_id, r.old, r.new) for r in result.relabeled] == [("b", "ok", "defect")]
    result = diff_versions(store, "proj", 1, 3)
    assert result.added == ["d", "e"]
    assert result.withdrawn == ["c"]
    assert [(r.item_id, r.old, r.new) for r in result.relabeled] == [
        ("a", "ok", "defect"),
        ("b", "ok", "defect"),
    ]
    assert lineage(store, "proj", 3) == [3, 2, 1]
    assert lineage(store, "proj", 1) == [1]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pa.table({"item_id": ["a"], "uri": ["u"]}), "lacks column"),
        (pa.table({"item_id": ["a"], "uri": ["u"], "label": ["cat"]}), "not in the label set"),
        (pa.table({"item_id": ["a", "a"], "uri": ["u", "v"], "label": ["ok", "ok"]}), "repeat"),
        (pa.table({"item_id": [""], "uri": ["u"], "label": ["ok"]}), "empty"),
        (pa.table({"item_id": ["a"], "uri": ["u"], "label": [None]}), "nulls"),
        (pa.table({"item_id": ["a"], "uri": ["u"], "label": ["ok"], "x": [1]}), "unknown col"),
    ],
)
def test_bad_items_tables_are_refused(table: pa.Table, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        normalize_items(table, labels=LABELS, now=T0)


def test_traversal_in_a_project_name_is_refused_and_nothing_written(store: DatasetStore) -> None:
    with pytest.raises(InvalidInput, match="unsafe project name"):
        commit_version(
            store,
            project="../other",
            version=1,
            parent_version=None,
            items=items({"a": "ok"}),
            labels=LABELS,
            created_at=T0,
        )
    assert store.list_keys() == []
