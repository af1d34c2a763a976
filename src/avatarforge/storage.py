"""Fetch and upload files by URI: local paths, ``file://`` and ``s3://bucket/key``.

Downloads are atomic — written to a temporary name beside ``dest``, checked against an
expected sha256 when one is given, then renamed — so a reader never sees a partial file and a
crash leaves only a ``.tmp-*`` file behind. S3 goes through boto3, which reads its endpoint
(``AWS_ENDPOINT_URL``, e.g. a local moto server), region and credentials from the environment.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .errors import AvatarforgeError
from .hashing import sha256_file

_CHUNK = 1024 * 1024
MAX_NAME_BYTES = 240  # a file name is at most 255 bytes; fetch() adds a ".tmp-*" suffix to it


class StorageError(AvatarforgeError, RuntimeError):
    """A fetch or upload failed; the message names the URI."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The URI names nothing: no such local file or S3 object."""

    status = 404


class ChecksumMismatchError(StorageError):
    """The fetched bytes do not have the expected sha256 (the file is not kept)."""


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_uri(uri: str) -> S3Uri:
    """``s3://bucket/key`` -> S3Uri; ValueError for anything else or an empty key."""
    parsed = urlparse(uri)
    key = parsed.path.lstrip("/")
    if parsed.scheme != "s3" or not parsed.netloc or not key:
        raise ValueError(f"not an s3://bucket/key URI: {uri!r}")
    return S3Uri(parsed.netloc, key)


def join_uri(prefix: str, name: str) -> str:
    """``prefix`` (folder path, ``file://`` or ``s3://`` prefix) joined with a relative name."""
    if prefix.startswith(("s3://", "file://")):
        return prefix.rstrip("/") + "/" + name
    return str(Path(prefix) / name)


def fetch(uri: str, dest: Path, *, sha256: str | None = None) -> Path:
    """Copy what ``uri`` names to the file ``dest`` atomically; returns ``dest``.

    ``uri``: a local path, ``file:///abs/path`` or ``s3://bucket/key``. With ``sha256`` the
    bytes are verified before the rename (:class:`ChecksumMismatchError` otherwise).
    Raises :class:`ObjectNotFoundError` when the source does not exist.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if uri.startswith("s3://"):
            _download_s3(parse_s3_uri(uri), tmp)
        else:
            _copy_local(local_path(uri), tmp)
        if sha256 is not None:
            actual = sha256_file(tmp)
            if actual != sha256.lower():
                raise ChecksumMismatchError(f"{uri}: sha256 is {actual}, expected {sha256.lower()}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


@dataclass(frozen=True)
class ObjectInfo:
    """One S3 object as a listing or HeadObject reports it (nothing downloaded yet)."""

    uri: str
    size: int

    @property
    def name(self) -> str:
        """The base name of its key (what it is called once fetched into a flat folder)."""
        return self.uri.rsplit("/", 1)[-1]


class ListingLimitError(StorageError):
    """A listing breaks a count or size limit (refused before any download)."""

    status = 400


def _split_prefix(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket/prefix URI: {uri!r}")
    prefix = parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return parsed.netloc, prefix


def list_prefix(uri: str, *, limit: int | None = None) -> list[ObjectInfo]:
    """The objects under ``s3://bucket/prefix/`` (folder markers left out), in key order.

    With ``limit``, the listing stops after ``limit`` objects: a caller that refuses more than
    N objects lists N + 1, not a hostile prefix's millions.
    """
    bucket, prefix = _split_prefix(uri)
    from botocore.exceptions import BotoCoreError, ClientError

    found: list[ObjectInfo] = []
    try:
        pages = _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):  # folder markers
                    continue
                found.append(ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"])))
                if limit is not None and len(found) >= limit:
                    return found
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"cannot list {uri}: {exc}") from exc
    return found


def head_objects(uris: list[str]) -> list[ObjectInfo]:
    """Size of each ``s3://bucket/key`` from HeadObject; :class:`ObjectNotFoundError` names the
    first that does not exist."""
    from botocore.exceptions import BotoCoreError, ClientError

    out = []
    for uri in uris:
        target = parse_s3_uri(uri)
        try:
            head = _s3_client().head_object(Bucket=target.bucket, Key=target.key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                raise ObjectNotFoundError(f"{uri}: no such object") from exc
            raise StorageError(f"{uri}: HeadObject failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"{uri}: HeadObject failed: {exc}") from exc
        out.append(ObjectInfo(str(target), int(head["ContentLength"])))
    return out


def check_listing(
    objects: list[ObjectInfo],
    where: str,
    *,
    max_objects: int,
    max_object_bytes: int,
    max_total_bytes: int | None = None,
    complete: bool = True,
) -> None:
    """Refuse (:class:`ListingLimitError`, naming the object or count) a listing with too many
    objects, one too large, or too many bytes in all; ``where`` names the listing in messages.
    Also refuses two objects that would get the same file name in a flat folder. ``complete``
    False says the listing was cut short (``list_prefix(limit=...)``): there may be more."""
    if len(objects) > max_objects:
        count = f"{len(objects)}" if complete else f"at least {len(objects)}"
        raise ListingLimitError(f"{where}: {count} objects, more than the limit of {max_objects}")
    names: dict[str, str] = {}
    for obj in objects:
        if obj.size > max_object_bytes:
            size, limit = obj.size / 2**20, max_object_bytes / 2**20
            raise ListingLimitError(
                f"{obj.uri}: {size:.0f} MiB, more than {limit:.0f} MiB per object"
            )
        if obj.name in names:
            raise ListingLimitError(
                f"{where}: two objects named {obj.name!r} ({names[obj.name]}, {obj.uri})"
            )
        if obj.name in ("", ".", ".."):
            raise ListingLimitError(f"{where}: {obj.uri} has no usable file name")
        if len(os.fsencode(obj.name)) > MAX_NAME_BYTES:
            raise ListingLimitError(
                f"{where}: {obj.uri}: file name longer than {MAX_NAME_BYTES} bytes"
            )
        names[obj.name] = obj.uri
    total = sum(o.size for o in objects)
    if max_total_bytes is not None and total > max_total_bytes:
        raise ListingLimitError(
            f"{where}: {total / 2**20:.1f} MiB in all, more than the limit of "
            f"{max_total_bytes / 2**20:.1f} MiB"
        )


def fetch_objects(objects: list[ObjectInfo], dest: Path) -> list[Path]:
    """Download each object into the folder ``dest`` under its base name (atomically, each)."""
    return [fetch(o.uri, Path(dest) / o.name) for o in sorted(objects, key=lambda o: o.name)]


def fetch_prefix(
    uri: str,
    dest: Path,
    *,
    max_objects: int = 200,
    max_object_bytes: int = 64 * 2**20,
    max_total_bytes: int | None = None,
) -> list[Path]:
    """Download every object under ``s3://bucket/prefix/`` into the folder ``dest`` (flat, by
    base name); returns the files. The limits are checked on the listing, before any download:
    an upload folder of selfies is small, and a larger one is refused with the key that broke it.
    """
    objects = list_prefix(uri, limit=max_objects + 1)
    if not objects:
        raise ObjectNotFoundError(f"{uri}: no objects under this prefix")
    check_listing(
        objects,
        uri,
        max_objects=max_objects,
        max_object_bytes=max_object_bytes,
        max_total_bytes=max_total_bytes,
        complete=len(objects) <= max_objects,
    )
    return fetch_objects(objects, dest)


def upload(path: Path, s3_uri: str) -> str:
    """Upload the file ``path`` to ``s3://bucket/key``; returns the URI.

    Never a visible partial object: boto3 sends a small file as one PUT and a large one as a
    multipart upload that S3 shows only once it is completed; a failed multipart upload is
    aborted by boto3's transfer manager (its parts are discarded).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file to upload")
    target = parse_s3_uri(s3_uri)
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _s3_client().upload_file(str(path), target.bucket, target.key)
    except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
        raise StorageError(f"upload of {path} to {target} failed: {exc}") from exc
    return str(target)


def delete(s3_uri: str) -> None:
    """Delete the object ``s3://bucket/key`` (no error when it is already gone)."""
    target = parse_s3_uri(s3_uri)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _s3_client().delete_object(Bucket=target.bucket, Key=target.key)
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"delete of {target} failed: {exc}") from exc


def local_path(uri: str) -> Path:
    """The file a local path or ``file://`` URI names; ValueError for any other scheme."""
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URI with a remote host is not supported: {uri!r}")
        return Path(unquote(parsed.path))
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme (local path, file:// or s3://): {uri!r}")
    return Path(uri)


def _copy_local(source: Path, tmp: Path) -> None:
    try:
        found = source.is_file()
    except OSError as exc:  # a name longer than the file system allows names no file either
        if exc.errno != errno.ENAMETOOLONG:
            raise
        found = False
    if not found:
        raise ObjectNotFoundError(f"{source}: no such file")
    with open(source, "rb") as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def _download_s3(source: S3Uri, tmp: Path) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _s3_client().download_file(source.bucket, source.key, str(tmp))
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise ObjectNotFoundError(f"{source}: no such object") from exc
        raise StorageError(f"{source}: download failed: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"{source}: download failed: {exc}") from exc


def _s3_client() -> Any:
    # One client per endpoint/credentials: creating a boto3 client costs ~50 ms, and tests
    # switch the endpoint through the environment.
    keys = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
            "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")  # fmt: skip
    return _cached_client(tuple(os.environ.get(k) for k in keys))


# botocore's "standard" retry mode: throttling (503 SlowDown), 5xx and connection errors are
# retried with exponential backoff and jitter, then raised (a clear StorageError here). The
# environment (AWS_RETRY_MODE, AWS_MAX_ATTEMPTS) still wins where it is set.
RETRY_MODE, MAX_ATTEMPTS = "standard", 5


@functools.lru_cache(maxsize=8)
def _cached_client(_env_key: tuple[str | None, ...]) -> Any:
    import boto3
    from botocore.config import Config

    retries: dict[str, Any] = {}
    if not os.environ.get("AWS_RETRY_MODE"):
        retries["mode"] = RETRY_MODE
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["total_max_attempts"] = MAX_ATTEMPTS
    config = Config(retries=retries, connect_timeout=10, read_timeout=60)
    return boto3.session.Session().client("s3", config=config)
