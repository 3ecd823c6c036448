"""Pool registration from folders (local and S3), manifests and .npz files, on both databases:
dedup, seed labels, unreadable images, columnar shards, and refusal of unsafe sources."""

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from numpy.typing import NDArray
from PIL import Image
from sqlmodel import Session, select

from services import db
from services.config import Settings
from services.datasets.decode import decode_image
from services.datasets.pool import add_to_pool, load_shard
from services.datasets.sources import locate
from services.datasets.store import open_store, s3_client
from services.errors import InvalidInput, NotFound
from services.models import Annotation, Item, Project
from services.projects import ProjectSpec, create_project, pool_counts
from services.state import refresh_label
from tests.conftest import Digits
from tests.integration.conftest import unique_name


def png(pixels: NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def digit_png(digits: Digits, index: int) -> bytes:
    return png(np.round(digits.images[index] * 255))


def image_project(session: Session, store_url: str, *, size: int = 8) -> Project:
    return create_project(
        session,
        ProjectSpec(
            name=unique_name("img"),
            labels=["other", "eight"],
            modality="image",
            store_url=store_url,
            image_size=size,
            image_channels=1,
        ),
    )


def items_of(session: Session, project: Project) -> list[Item]:
    return list(
        session.exec(select(Item).where(Item.project_id == project.id).order_by(Item.external_id))
    )


def test_local_folder_with_a_broken_image_and_dedup(
    engine: sa.Engine, tmp_path: Path, settings: Settings, digits: Digits
) -> None:
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        (folder / ("sub" if i % 2 else "") / f"d{i}.png").write_bytes(digit_png(digits, i))
    (folder / "sub" / "copy-of-d0.png").write_bytes(digit_png(digits, 0))  # same content
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image")
    store_url = f"file://{tmp_path / 'store'}"
    with db.session_scope(engine) as session:
        project = image_project(session, store_url)
        report = add_to_pool(
            session, project, str(folder), settings=settings, trusted_roots=[f"file://{folder}"]
        )
        assert (report.seen, report.added, report.duplicates, report.unreadable) == (7, 6, 1, 1)
        rows = {item.external_id: item for item in items_of(session, project)}
        assert sorted(rows) == [
            "broken.png",
            "d0.png",
            "d2.png",
            "d4.png",
            "sub/d1.png",
            "sub/d3.png",
        ]
        assert rows["broken.png"].status == "unreadable"
        assert "cannot decode image" in (rows["broken.png"].status_reason or "")
        assert rows["broken.png"].shard_key is None
        assert pool_counts(session, project).by_status["unlabeled"] == 5
        # Adding the same folder again adds nothing.
        again = add_to_pool(
            session, project, str(folder), settings=settings, trusted_roots=[f"file://{folder}"]
        )
        assert (again.added, again.duplicates, again.shards) == (0, 7, [])
        # The shard holds the decoded pixels of each item at its recorded row.
        store = open_store(store_url, settings)
        item = rows["sub/d3.png"]
        shard = load_shard(store, item.shard_key or "")
        assert shard.data.shape[1:] == (1, 8, 8)
        assert shard.item_ids[item.shard_row or 0] == "sub/d3.png"
        expected = decode_image(digit_png(digits, 3), size=8, channels=1) / 255.0
        np.testing.assert_allclose(shard.data[item.shard_row or 0], expected, atol=1e-6)


def test_s3_prefix_of_images(engine: sa.Engine, settings: Settings, digits: Digits) -> None:
    bucket = unique_name("raw")
    client = s3_client(settings)
    client.create_bucket(Bucket=bucket)
    for i in range(4):
        client.put_object(Bucket=bucket, Key=f"batch1/img {i}.png", Body=digit_png(digits, i))
    client.put_object(Bucket=bucket, Key="elsewhere/x.png", Body=digit_png(digits, 9))
    with db.session_scope(engine) as session:
        project = image_project(session, f"s3://{unique_name('store')}/pool")
        report = add_to_pool(
            session,
            project,
            f"s3://{bucket}/batch1",
            settings=settings,
            trusted_roots=[f"s3://{bucket}/batch1"],
        )
        assert (report.added, report.unreadable, len(report.shards)) == (4, 0, 1)
        names = [item.external_id for item in items_of(session, project)]
        assert names == ["img 0.png", "img 1.png", "img 2.png", "img 3.png"]
        assert items_of(session, project)[0].uri == f"s3://{bucket}/batch1/img 0.png"


def test_manifest_with_seed_labels(
    engine: sa.Engine, tmp_path: Path, settings: Settings, digits: Digits
) -> None:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    lines = ["item_id,uri,label"]
    for i in range(6):
        (root / "images" / f"{i}.png").write_bytes(digit_png(digits, i))
        label = "eight" if i == 0 else ("other" if i < 3 else "")
        lines.append(f"00{i},images/{i}.png,{label}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    with db.session_scope(engine) as session:
        project = image_project(session, f"file://{tmp_path / 'store'}")
        report = add_to_pool(
            session,
            project,
            str(root / "manifest.csv"),
            settings=settings,
            trusted_roots=[f"file://{root}"],
        )
        assert (report.added, report.seed_labels) == (6, 3)
        rows = items_of(session, project)
        assert [r.external_id for r in rows] == ["000", "001", "002", "003", "004", "005"]
        assert [r.label for r in rows] == ["eight", "other", "other", None, None, None]
        assert [r.status for r in rows] == ["labeled"] * 3 + ["unlabeled"] * 3
        seeds = session.exec(select(Annotation).where(Annotation.project_id == project.id)).all()
        assert {(a.source, a.annotator) for a in seeds} == {("seed", "seed")}
        # The bulk-written label is what the general rule derives from the annotations.
        for row in rows[:3]:
            assert refresh_label(session, row).label == row.label


def test_npz_features(
    engine: sa.Engine, tmp_path: Path, settings: Settings, digits: Digits
) -> None:
    features = digits.features[:50].copy()
    features[7, 3] = np.nan
    labels = np.array(["eight" if y == 8 else "" for y in digits.labels[:50]])
    path = tmp_path / "features.npz"
    np.savez(path, features=features, labels=labels)
    with db.session_scope(engine) as session:
        project = create_project(
            session,
            ProjectSpec(
                name=unique_name("feat"),
                labels=["other", "eight"],
                modality="features",
                store_url=f"file://{tmp_path / 'store'}",
            ),
        )
        report = add_to_pool(
            session, project, str(path), settings=settings, trusted_roots=[f"file://{tmp_path}"]
        )
        assert report.unreadable == 1
        assert report.seed_labels == int((digits.labels[:50] == 8).sum())
        assert project.feature_dim == 64
        row = session.exec(
            select(Item).where(Item.project_id == project.id, Item.uri.endswith("#row=12"))
        ).one()
        shard = load_shard(open_store(project.store_url, settings), row.shard_key or "")
        np.testing.assert_array_equal(shard.data[row.shard_row or 0], digits.features[12])
        wrong = tmp_path / "narrow.npz"
        np.savez(wrong, features=np.ones((3, 10), dtype=np.float32))
        with pytest.raises(InvalidInput, match="feature width"):
            add_to_pool(
                session,
                project,
                str(wrong),
                settings=settings,
                trusted_roots=[f"file://{tmp_path}"],
            )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("../outside.png", "unsafe path"),
        ("images/../../outside.png", "unsafe path"),
        ("/etc/passwd", "unsafe path"),
        ("images/%2e%2e/%2e%2e/outside.png", "unsafe path"),
        ("images\\..\\outside.png", "unsafe path"),
        ("http://169.254.169.254/latest/meta-data", "only file:// and s3://"),
        ("file:///etc/passwd", "outside the trusted source roots"),
        ("s3://someone-elses-bucket/x.png", "outside the trusted source roots"),
        ("link/outside.png", "resolves outside"),
    ],
)
def test_unsafe_manifest_uris_are_refused_and_nothing_is_written(
    engine: sa.Engine, tmp_path: Path, settings: Settings, digits: Digits, uri: str, message: str
) -> None:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "fine.png").write_bytes(digit_png(digits, 1))
    (tmp_path / "outside.png").write_bytes(digit_png(digits, 2))
    os.symlink(tmp_path, root / "link")
    rows = [{"item_id": "a", "uri": "images/fine.png"}, {"item_id": "b", "uri": uri}]
    (root / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    store_dir = tmp_path / "store"
    with db.session_scope(engine) as session:
        project = image_project(session, f"file://{store_dir}")
        with pytest.raises(InvalidInput, match=message):
            add_to_pool(
                session,
                project,
                str(root / "manifest.jsonl"),
                settings=settings,
                trusted_roots=[f"file://{root}"],
            )
        assert items_of(session, project) == []
    assert not store_dir.exists()


def test_unknown_seed_labels_and_reused_ids_are_refused(
    engine: sa.Engine, tmp_path: Path, settings: Settings, digits: Digits
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(digit_png(digits, i))
    (root / "bad-label.csv").write_text("item_id,uri,label\na,0.png,other\nb,1.png,cat\n")
    (root / "first.csv").write_text("item_id,uri\na,0.png\n")
    (root / "reuse.csv").write_text("item_id,uri\na,2.png\n")
    roots = [f"file://{root}"]
    with db.session_scope(engine) as session:
        project = image_project(session, f"file://{tmp_path / 'store'}")
        with pytest.raises(InvalidInput, match=r"\['cat'\] .* not in project"):
            add_to_pool(
                session,
                project,
                str(root / "bad-label.csv"),
                settings=settings,
                trusted_roots=roots,
            )
        assert items_of(session, project) == []
        add_to_pool(
            session, project, str(root / "first.csv"), settings=settings, trusted_roots=roots
        )
        with pytest.raises(InvalidInput, match="already name other content"):
            add_to_pool(
                session, project, str(root / "reuse.csv"), settings=settings, trusted_roots=roots
            )
        assert [i.external_id for i in items_of(session, project)] == ["a"]


def test_locate_maps_uris_into_the_longest_matching_root(tmp_path: Path) -> None:
    location = locate(f"file://{tmp_path}/a/b.png", [f"file://{tmp_path}", f"file://{tmp_path}/a"])
    assert (location.root.root, location.path) == (f"{tmp_path}/a", "b.png")
    assert locate("s3://bucket/pre/x/y.png", ["s3://bucket/pre"]).path == "x/y.png"
    with pytest.raises(InvalidInput, match="outside"):
        locate("s3://bucket/prefix-other/y.png", ["s3://bucket/prefix"])


def test_decode_image_resizes_and_converts(digits: Digits) -> None:
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[:, :, 0] = 255
    pixels = decode_image(png(rgb), size=16, channels=3)
    assert pixels.shape == (3, 16, 16)
    assert (pixels[0] == 255).all() and (pixels[1] == 0).all()
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(b"GIF89a broken", size=16, channels=1)


def test_a_source_that_does_not_exist_says_so(
    engine: sa.Engine, settings: Settings, tmp_path: Path
) -> None:
    """Before, a missing folder answered "expected a folder, a manifest ... or an .npz"."""
    with db.session_scope(engine) as session:
        project = image_project(session, f"file://{tmp_path / 'store'}")
        for missing in (tmp_path / "no-such-folder", tmp_path / "no-such-file.png"):
            with pytest.raises(NotFound, match=f"^file://{missing} does not exist$"):
                add_to_pool(
                    session,
                    project,
                    str(missing),
                    settings=settings,
                    trusted_roots=[f"file://{tmp_path}"],
                )
        assert pool_counts(session, project).total == 0
