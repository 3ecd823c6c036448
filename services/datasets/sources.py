"""Where pool items may be read from: trusted roots (file:///dir/ or s3://bucket/prefix/),
locations inside them, and a reader for their bytes and folder listings.

A uri outside every root, with another scheme (no http: no server-side request forgery), with
'..', '%' escapes, backslashes or control characters is refused before anything is read; local
symlinks may not lead out of their root.
"""

import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from botocore.exceptions import ClientError

from services.config import Settings
from services.datasets.store import (
    StoreUrl,
    s3_client,
)
from services.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MAX_IMAGE_PIXELS = 40_000_000  # bigger images are marked unreadable, not decoded
MAX_IMAGE_BYTES = 64 * 1024 * 1024  # per image file
MAX_TABLE_BYTES = 8 * 1024 * 1024 * 1024  # a manifest or an .npz of features, read whole


def _check_relative(path: str) -> str:
    """A relative '/'-separated path with no way out of its root, else InvalidInput."""
    bad = (
        not path
        or path.startswith("/")
        or "\\" in path
        or "%" in path
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in path)
        or any(part in ("", ".", "..") for part in path.split("/"))
    )
    if bad:
        raise InvalidInput(
            f"unsafe path {path!r}: relative paths only, without '..', '.', empty parts, "
            "'%', '\\\\' or control characters"
        )
    return path


@dataclass(frozen=True)
class Location:
    """A file or folder inside a trusted root: scheme file (root is a directory) or s3."""

    root: StoreUrl
    path: str  # relative to the root, "" for the root itself

    def uri(self) -> str:
        base = str(self.root).rstrip("/")
        return f"{base}/{self.path}" if self.path else base

    def child(self, relative: str) -> "Location":
        _check_relative(relative)
        return Location(self.root, posixpath.join(self.path, relative) if self.path else relative)

    def parent(self) -> "Location":
        return Location(self.root, posixpath.dirname(self.path))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


def _parse_roots(roots: Sequence[str]) -> list[StoreUrl]:
    return [StoreUrl.parse(root.rstrip("/")) for root in roots]


def locate(uri: str, roots: Sequence[str]) -> Location:
    """Place `uri` (file:///..., s3://..., or a local path) inside the longest matching trusted
    root; InvalidInput when it lies outside every root or uses another scheme."""
    if "://" not in uri:
        uri = "file://" + os.path.abspath(uri) if uri else uri
    parts = urlsplit(uri)
    if parts.scheme not in ("file", "s3"):
        raise InvalidInput(f"{uri!r}: only file:// and s3:// sources are read, nothing else")
    if parts.query or parts.fragment or "%" in uri or "\\" in uri:
        raise InvalidInput(f"unsafe source {uri!r}: no '%', '\\', '?' or '#'")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidInput(f"{uri!r}: local sources are file:///absolute/path")
        target = parts.path.rstrip("/") or "/"
    else:
        target = parts.path.strip("/")
    for root in sorted(_parse_roots(roots), key=lambda r: len(r.root), reverse=True):
        if root.scheme != parts.scheme or root.bucket != (parts.netloc if root.bucket else ""):
            continue
        if target == root.root:
            return Location(root, "")
        prefix = root.root.rstrip("/") + "/" if root.root else ""
        if target.startswith(prefix):
            relative = _check_relative(target[len(prefix) :])
            if root.scheme == "file":
                _check_inside(root.root, relative)
            return Location(root, relative)
    raise InvalidInput(
        f"{uri!r} is outside the trusted source roots {list(roots)}; "
        "add its folder or prefix to FOCALLOOP_SOURCE_ROOTS"
    )


def _check_inside(root: str, relative: str) -> None:
    """Symlinks must not lead out of a local root."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, relative))
    if real != real_root and not real.startswith(real_root + os.sep):
        raise InvalidInput(f"{relative!r} resolves outside its root {root!r}")


class SourceReader:
    """Reads bytes and lists files at trusted locations (local folders or S3 prefixes)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: S3Client | None = None

    def _s3(self) -> "S3Client":
        if self._client is None:
            self._client = s3_client(self.settings)
        return self._client

    def read(self, location: Location, *, limit: int = MAX_IMAGE_BYTES) -> bytes:
        """The file's bytes; InvalidInput when it is larger than `limit`."""
        if location.root.scheme == "file":
            _check_inside(location.root.root, location.path)
            path = Path(location.root.root, location.path)
            try:
                if path.stat().st_size > limit:
                    raise InvalidInput(f"{location.uri()} is larger than {limit} bytes")
                return path.read_bytes()
            except FileNotFoundError:
                raise NotFound(f"{location.uri()} does not exist") from None
            except IsADirectoryError:
                raise InvalidInput(f"{location.uri()} is a folder, not a file") from None
        store = self._s3_store(location)
        return store.get_raw(location.path, limit=limit)

    def exists(self, location: Location) -> bool:
        """Whether a local file or folder is there (S3 locations: True, their reads say)."""
        if location.root.scheme == "file":
            _check_inside(location.root.root, location.path)
            return Path(location.root.root, location.path).exists()
        return True

    def is_folder(self, location: Location) -> bool:
        if location.root.scheme == "file":
            return Path(location.root.root, location.path).is_dir()
        return not posixpath.splitext(location.path)[1]

    def list_files(self, folder: Location) -> list[Location]:
        """Image files below `folder`, sorted by path (hidden files and folders skipped)."""
        found: list[str] = []
        if folder.root.scheme == "file":
            base = Path(folder.root.root, folder.path)
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel_dir = Path(dirpath).relative_to(folder.root.root).as_posix()
                found.extend(
                    posixpath.join(rel_dir, name) if rel_dir != "." else name
                    for name in filenames
                    if not name.startswith(".")
                )
        else:
            found = self._s3_store(folder).list_raw(folder.path)
        locations = []
        for path in sorted(found):
            if posixpath.splitext(path)[1].lower() in IMAGE_SUFFIXES:
                try:
                    locations.append(Location(folder.root, _check_relative(path)))
                except InvalidInput:
                    continue  # a name we refuse to read is not part of the pool
        return locations

    def _s3_store(self, location: Location) -> "_RawS3":
        return _RawS3(self._s3(), location.root)


class _RawS3:
    """Reads keys under an S3 root without the dataset store's strict key syntax (pool images
    may have any safe relative name)."""

    def __init__(self, client: "S3Client", root: StoreUrl) -> None:
        self.client = client
        self.root = root

    def _key(self, path: str) -> str:
        return f"{self.root.root}/{path}" if self.root.root else path

    def get_raw(self, path: str, *, limit: int) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.root.bucket, Key=self._key(path))
        except ClientError as error:
            raise NotFound(f"s3://{self.root.bucket}/{self._key(path)}: {error}") from None
        if response["ContentLength"] > limit:
            raise InvalidInput(f"s3://{self.root.bucket}/{self._key(path)} is too large")
        return response["Body"].read()

    def list_raw(self, folder: str) -> list[str]:
        prefix = self._key(folder).rstrip("/") + "/" if folder or self.root.root else ""
        strip = len(self.root.root.rstrip("/") + "/") if self.root.root else 0
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.root.bucket, Prefix=prefix
        ):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return keys
