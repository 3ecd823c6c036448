"""The dataset store: write-once objects under one root, on a local directory or on S3.

One contract (`DatasetStore`), two backends held to the same contract test. Keys are relative to
the store's root and made of safe segments only (`safe_key`), so no name from a user can leave
the root. Every write is create-only: a local write links a fully written temporary file into
place (exclusive, never partial); an S3 write is a `PutObject` with `IfNoneMatch="*"` and a
SHA-256 checksum the server checks. Writing bytes that are already there is a no-op (retries are
safe); writing other bytes under a taken key is a `Conflict` and changes nothing.
"""

import base64
import contextlib
import hashlib
import os
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from services.config import Settings
from services.errors import Conflict, InvalidInput, NotFound, TransientError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# A key segment: starts with a letter or digit, then letters, digits, dot, underscore, hyphen.
# Percent signs, backslashes, control characters and ".." never pass, so neither a raw nor an
# encoded traversal can be smuggled through a name.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_segment(segment: str, *, what: str = "name") -> str:
    """`segment` if it is a safe single path segment, else InvalidInput saying why."""
    if not _SEGMENT.fullmatch(segment) or ".." in segment:
        raise InvalidInput(
            f"unsafe {what} {segment!r}: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, no '..', no '/', '%' or '\\\\')"
        )
    return segment


def safe_key(*segments: str) -> str:
    """Join already-safe segments into a store key; every segment is checked."""
    if not segments:
        raise InvalidInput("empty store key")
    return "/".join(check_segment(s, what="key segment") for s in segments)


def _check_key(key: str) -> str:
    for segment in key.split("/"):
        check_segment(segment, what="key segment")
    return key


@dataclass(frozen=True)
class StoreUrl:
    """A parsed store URL: `file:///abs/dir` or `s3://bucket[/prefix]`."""

    scheme: str
    bucket: str  # "" for file
    root: str  # absolute directory for file; key prefix ("" or "a/b") for s3

    @classmethod
    def parse(cls, url: str) -> "StoreUrl":
        if any(ch in url for ch in ("\\", "\x00", "%")) or any(ord(ch) < 32 for ch in url):
            raise InvalidInput(f"store URL {url!r} has '%', '\\\\' or control characters")
        parts = urlsplit(url)
        if parts.query or parts.fragment:
            raise InvalidInput(f"store URL {url!r} must not have a query or fragment")
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise InvalidInput(f"store URL {url!r}: file URLs name no host (file:///dir)")
            path = unquote(parts.path)
            if not path.startswith("/"):
                raise InvalidInput(f"store URL {url!r}: the directory must be absolute")
            if any(seg == ".." for seg in path.split("/")):
                raise InvalidInput(f"store URL {url!r} must not contain '..'")
            return cls("file", "", os.path.normpath(path))
        if parts.scheme == "s3":
            bucket = parts.netloc
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket) or ".." in bucket:
                raise InvalidInput(f"store URL {url!r}: {bucket!r} is not a valid S3 bucket name")
            prefix = parts.path.strip("/")
            if prefix:
                _check_key(prefix)
            return cls("s3", bucket, prefix)
        raise InvalidInput(
            f"store URL {url!r}: only file:///dir and s3://bucket/prefix are allowed"
        )

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.root}"
        return f"s3://{self.bucket}/{self.root}" if self.root else f"s3://{self.bucket}"


class DatasetStore(ABC):
    """Write-once objects under one root. Keys are '/'-joined safe segments."""

    url: StoreUrl

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Store `data` under `key` unless it is there already.

        Returns True when this call wrote it, False when identical bytes were already in place
        (a retry). Raises Conflict when other bytes hold the key; nothing is overwritten.
        """
        digest = sha256_hex(data)
        if self._create(_check_key(key), data, digest):
            return True
        existing = self.get(key)
        if sha256_hex(existing) != digest:
            raise Conflict(f"{self.describe(key)} already exists with other content; not replaced")
        return False

    @abstractmethod
    def _create(self, key: str, data: bytes, sha256: str) -> bool:
        """Create-only write: True if created, False if the key already existed."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; NotFound if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` (a '/'-ended folder or ""), sorted."""

    @abstractmethod
    def check_writable(self) -> None:
        """Write and remove a probe object; raises what the write raises (readiness)."""

    def describe(self, key: str) -> str:
        return f"{self.url}/{key}"


class LocalStore(DatasetStore):
    """A directory. Writes go to a temporary file in the target folder, are fsynced, then
    hard-linked into place: `link` fails if the name exists, so creation is exclusive and a
    reader never sees a half-written object."""

    def __init__(self, url: StoreUrl) -> None:
        self.url = url
        self.root = Path(url.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def _create(self, key: str, data: bytes, sha256: str) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def check_writable(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".focalloop-ready-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.describe(key)} does not exist") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(
            path.relative_to(self.root).as_posix()
            for path in base.rglob("*")
            if path.is_file() and not path.name.startswith(".tmp-")
        )


class S3Store(DatasetStore):
    """A bucket and prefix on S3 or any S3-compatible server (MinIO, moto)."""

    def __init__(self, url: StoreUrl, client: "S3Client") -> None:
        self.url = url
        self.client = client
        self.bucket = url.bucket

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.url.root}/{key}" if self.url.root else key

    def ensure_bucket(self) -> None:
        """Create the bucket with versioning switched on, unless it exists already."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as error:
            if _status(error) != 404:
                raise _s3_error(error, f"s3://{self.bucket}") from error
        region = self.client.meta.region_name
        try:
            if region and region != "us-east-1":
                self.client.create_bucket(
                    Bucket=self.bucket,
                    CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
                )
            else:
                self.client.create_bucket(Bucket=self.bucket)
        except ClientError as error:
            if _code(error) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise _s3_error(error, f"s3://{self.bucket}") from error
        self.client.put_bucket_versioning(
            Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"}
        )

    def _create(self, key: str, data: bytes, sha256: str) -> bool:
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                IfNoneMatch="*",
                ChecksumSHA256=checksum,
            )
            return True
        except ClientError as error:
            # 412: the key exists. 409: a concurrent conditional write to the same key is in
            # flight; the caller then compares with whatever won, like a 412.
            if _status(error) in (409, 412):
                return False
            raise _s3_error(error, self.describe(key)) from error

    def check_writable(self) -> None:
        key = self._key(f".focalloop-ready-{uuid.uuid4().hex}")
        try:
            written = self.client.put_object(Bucket=self.bucket, Key=key, Body=b"ok")
            # The version itself, so a versioned bucket keeps no trace of the probe.
            version = {"VersionId": written["VersionId"]} if written.get("VersionId") else {}
            self.client.delete_object(Bucket=self.bucket, Key=key, **version)  # type: ignore[arg-type]
        except ClientError as error:
            raise _s3_error(error, f"s3://{self.bucket}/{key}") from error

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read()
        except ClientError as error:
            if _status(error) == 404 or _code(error) in ("NoSuchKey", "NoSuchBucket"):
                raise NotFound(f"{self.describe(key)} does not exist") from None
            raise _s3_error(error, self.describe(key)) from error

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as error:
            if _status(error) == 404:
                return False
            raise _s3_error(error, self.describe(key)) from error

    def list_keys(self, prefix: str = "") -> list[str]:
        full = (
            self._key(prefix.rstrip("/")) + "/"
            if prefix
            else (f"{self.url.root}/" if self.url.root else "")
        )
        strip = len(f"{self.url.root}/") if self.url.root else 0
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except ClientError as error:
            if _code(error) == "NoSuchBucket":
                return []
            raise _s3_error(error, str(self.url)) from error
        return sorted(keys)

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _s3_error(error: ClientError, where: str) -> Exception:
    status = _status(error)
    message = f"S3 error at {where}: {_code(error)} ({status})"
    if status in (403, 400):
        return InvalidInput(message + "; check the bucket, credentials and endpoint")
    return TransientError(message)


def s3_client(settings: Settings) -> "S3Client":
    """A boto3 S3 client. Endpoint and credentials come from focalloop settings when set, else
    from boto3's standard chain (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, profiles, roles)."""
    kwargs: dict[str, Any] = {
        "config": BotoConfig(
            retries={"mode": "standard", "max_attempts": 5},
            max_pool_connections=32,
            # MinIO and moto serve path-style URLs on any host; virtual-host style needs DNS.
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
        )
    }
    if settings.s3_endpoint_url:
        kwargs["endpoint_url"] = settings.s3_endpoint_url
    if settings.s3_region:
        kwargs["region_name"] = settings.s3_region
    if settings.s3_access_key_id and settings.s3_secret_access_key:
        kwargs["aws_access_key_id"] = settings.s3_access_key_id
        kwargs["aws_secret_access_key"] = settings.s3_secret_access_key.get_secret_value()
    client: S3Client = boto3.session.Session().client("s3", **kwargs)
    return client


def open_store(url: str, settings: Settings, *, create: bool = False) -> DatasetStore:
    """The store at `url`. `create=True` makes the local directory or the S3 bucket (with
    versioning on) when missing; readers pass False and get an empty store instead."""
    parsed = StoreUrl.parse(url)
    if parsed.scheme == "file":
        store = LocalStore(parsed)
        if create:
            store.root.mkdir(parents=True, exist_ok=True)
        return store
    s3 = S3Store(parsed, s3_client(settings))
    if create:
        s3.ensure_bucket()
    return s3
