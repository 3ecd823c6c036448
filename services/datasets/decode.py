"""A pool source's items, read and decoded (nothing stored yet): a folder of images, a manifest
(.csv / .jsonl / .parquet with item_id, uri[, label]) or an .npz of features or images. Images are
resized to the project's size (aspect ratio not kept) as uint8 [C, H, W]; features are float32
[d]. An item that cannot be decoded carries the reason instead of data.
"""

import io
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from services.datasets.sources import (
    MAX_IMAGE_PIXELS,
    MAX_TABLE_BYTES,
    Location,
    SourceReader,
    locate,
)
from services.datasets.store import sha256_hex
from services.datasets.tables import read_table_bytes, table_format
from services.errors import InvalidInput, NotFound
from services.models import Project

_IO_THREADS = 8


@dataclass
class Candidate:
    """One incoming item before it is stored."""

    external_id: str
    uri: str
    content_hash: str
    label: str | None
    data: NDArray[Any] | None  # features [d] float32 or image [C, H, W] uint8; None if unreadable
    unreadable_reason: str | None = None


def _check_item_id(item_id: str) -> str:
    if not item_id or len(item_id) > 200 or any(ord(ch) < 32 for ch in item_id):
        raise InvalidInput(f"invalid item_id {item_id!r}: 1-200 characters, no control characters")
    return item_id


def decode_image(data: bytes, *, size: int, channels: int) -> NDArray[np.uint8]:
    """Decode image bytes to uint8 [channels, size, size]. Raises ValueError with a readable
    reason when the bytes are not a decodable image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{image.width}x{image.height} pixels is too large")
            image.load()
            oriented = ImageOps.exif_transpose(image)
            converted = oriented.convert("L" if channels == 1 else "RGB")
            resized = converted.resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(resized, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode image: {error}") from None
    if channels == 1:
        return pixels[np.newaxis, :, :].copy()
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _npz_arrays(data: bytes, source: str) -> dict[str, NDArray[Any]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError) as error:
        raise InvalidInput(f"{source}: not a readable .npz ({error})") from None


def _npz_rows(
    arrays: dict[str, NDArray[Any]], n: int, source: str
) -> list[tuple[str | None, str | None]]:
    """(item id or None, label or None) per row from the optional item_ids and labels."""
    item_ids = arrays.get("item_ids")
    labels = arrays.get("labels")
    for name, array in (("item_ids", item_ids), ("labels", labels)):
        if array is not None and array.shape != (n,):
            raise InvalidInput(f"{source}: '{name}' must have shape [{n}]")
    return [
        (
            str(item_ids[row]) if item_ids is not None else None,
            str(labels[row]) if labels is not None and str(labels[row]) else None,
        )
        for row in range(n)
    ]


def _from_npz(data: bytes, source: str) -> list[Candidate]:
    arrays = _npz_arrays(data, source)
    if "features" not in arrays:
        raise InvalidInput(f"{source}: the .npz needs a 'features' array [n, d]")
    features = arrays["features"]
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.number):
        raise InvalidInput(f"{source}: 'features' must be a numeric [n, d] array")
    features = features.astype(np.float32)
    candidates = []
    for row, (item_id, label) in enumerate(_npz_rows(arrays, len(features), source)):
        vector = np.ascontiguousarray(features[row])
        digest = sha256_hex(vector.tobytes())
        finite = bool(np.isfinite(vector).all())
        candidates.append(
            Candidate(
                external_id=_check_item_id(item_id or digest[:16]),
                uri=f"{source}#row={row}",
                content_hash=digest,
                label=label,
                data=vector if finite else None,
                unreadable_reason=None if finite else "features contain NaN or infinity",
            )
        )
    return candidates


def _images_from_npz(data: bytes, source: str, *, size: int, channels: int) -> list[Candidate]:
    """Decoded images given as arrays: 'images' [n, H, W] or [n, C, H, W], uint8 or floats in
    [0, 1], already the project's size and channels (a simulation's data, or a pre-decoded
    set); stored as uint8 [C, H, W] like decoded image files."""
    arrays = _npz_arrays(data, source)
    if "images" not in arrays:
        raise InvalidInput(f"{source}: an image project's .npz needs an 'images' array")
    images = arrays["images"]
    if images.ndim == 3:
        images = images[:, np.newaxis]
    if images.ndim != 4 or images.shape[1:] != (channels, size, size):
        raise InvalidInput(
            f"{source}: 'images' must be [n, {size}, {size}] or [n, {channels}, {size}, {size}] "
            f"for this project, got {arrays['images'].shape}"
        )
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating) or not (
            np.all(np.isfinite(images)) and images.min() >= 0.0 and images.max() <= 1.0
        ):
            raise InvalidInput(f"{source}: 'images' must be uint8 or floats in [0, 1]")
        images = np.round(images * 255.0).astype(np.uint8)
    candidates = []
    for row, (item_id, label) in enumerate(_npz_rows(arrays, len(images), source)):
        pixels = np.ascontiguousarray(images[row])
        digest = sha256_hex(pixels.tobytes())
        candidates.append(
            Candidate(
                external_id=_check_item_id(item_id or digest[:16]),
                uri=f"{source}#row={row}",
                content_hash=digest,
                label=label,
                data=pixels,
            )
        )
    return candidates


def _image_candidate(
    reader: SourceReader,
    location: Location,
    *,
    external_id: str,
    label: str | None,
    size: int,
    channels: int,
) -> Candidate:
    data = reader.read(location)
    digest = sha256_hex(data)
    try:
        pixels: NDArray[Any] | None = decode_image(data, size=size, channels=channels)
        reason = None
    except ValueError as error:
        pixels, reason = None, str(error)[:1000]
    return Candidate(external_id, location.uri(), digest, label, pixels, reason)


def read_candidates(
    source: Location, project: Project, reader: SourceReader, roots: Sequence[str]
) -> list[Candidate]:
    """Every item a source describes, decoded (nothing stored yet)."""
    suffix = posixpath.splitext(source.path)[1].lower()
    image_args = {"size": project.image_size or 32, "channels": project.image_channels or 1}
    if suffix == ".npz":
        data = reader.read(source, limit=MAX_TABLE_BYTES)
        if project.modality == "features":
            return _from_npz(data, source.uri())
        return _images_from_npz(data, source.uri(), **image_args)
    if project.modality == "features":
        raise InvalidInput(
            f"project {project.name!r} takes features: give an .npz with a 'features' array"
        )
    if suffix in (".csv", ".jsonl", ".ndjson", ".parquet", ".pq"):
        table = read_table_bytes(
            reader.read(source, limit=MAX_TABLE_BYTES), table_format(source.path), name=source.uri()
        )
        for column in ("item_id", "uri"):
            if column not in table.column_names:
                raise InvalidInput(f"{source.uri()}: a manifest needs columns item_id, uri")
        rows = table.to_pylist()
        jobs = []
        for row in rows:
            uri = str(row["uri"] or "")
            location = locate(uri, roots) if "://" in uri else source.parent().child(uri)
            label = row.get("label")
            jobs.append((location, _check_item_id(str(row["item_id"] or "")), label or None))
    elif reader.is_folder(source):
        jobs = [
            (loc, loc.path[len(source.path) :].lstrip("/"), None)
            for loc in reader.list_files(source)
        ]
        if not jobs:
            raise InvalidInput(f"{source.uri()}: no image files found")
    elif not reader.exists(source):
        raise NotFound(f"{source.uri()} does not exist")
    else:
        raise InvalidInput(
            f"{source.uri()}: expected a folder, a manifest (.csv/.jsonl/.parquet) or an .npz"
        )
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        return list(
            pool.map(
                lambda job: _image_candidate(
                    reader, job[0], external_id=job[1], label=job[2], **image_args
                ),
                jobs,
            )
        )
