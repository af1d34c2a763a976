"""Fetch and upload files by URI: local paths, ``file://`` and ``s3://bucket/key``.

Downloads are atomic — written to a temporary name beside ``dest``, checked against an
expected sha256 when one is given, then renamed — so a reader never sees a partial file and a
crash leaves only a ``.tmp-*`` file behind. S3 goes through boto3, which reads its endpoint
(``AWS_ENDPOINT_URL``, e.g. a local moto server), region and credentials from the environment.
"""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .hashing import sha256_file

_CHUNK = 1024 * 1024


class StorageError(RuntimeError):
    """A fetch or upload failed; the message names the URI."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The URI names nothing: no such local file or S3 object."""


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


def fetch_prefix(
    uri: str, dest: Path, *, max_objects: int = 200, max_object_bytes: int = 64 * 2**20
) -> list[Path]:
    """Download every object under ``s3://bucket/prefix/`` into the folder ``dest`` (flat, by
    base name); returns the files. The limits are checked on the listing, before any download:
    an upload folder of selfies is small, and a larger one is refused with the key that broke it.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket/prefix URI: {uri!r}")
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        pages = _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        objects = [o for page in pages for o in page.get("Contents", [])]
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"cannot list {uri}: {exc}") from exc
    objects = [o for o in objects if not o["Key"].endswith("/")]  # folder markers
    if not objects:
        raise ObjectNotFoundError(f"{uri}: no objects under this prefix")
    if len(objects) > max_objects:
        raise StorageError(f"{uri}: {len(objects)} objects, more than the limit of {max_objects}")
    names: dict[str, str] = {}
    for obj in objects:
        if obj["Size"] > max_object_bytes:
            size, limit = obj["Size"] / 2**20, max_object_bytes / 2**20
            raise StorageError(
                f"s3://{bucket}/{obj['Key']}: {size:.0f} MiB, more than {limit:.0f} MiB per object"
            )
        name = obj["Key"].rsplit("/", 1)[-1]
        if name in names:
            raise StorageError(f"{uri}: two objects named {name!r} ({names[name]}, {obj['Key']})")
        names[name] = obj["Key"]
    return [fetch(f"s3://{bucket}/{key}", Path(dest) / name) for name, key in sorted(names.items())]


def upload(path: Path, s3_uri: str) -> str:
    """Upload the file ``path`` to ``s3://bucket/key``; returns the URI."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file to upload")
    target = parse_s3_uri(s3_uri)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _s3_client().upload_file(str(path), target.bucket, target.key)
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"upload of {path} to {target} failed: {exc}") from exc
    return str(target)


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
    if not source.is_file():
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
    keys = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID")
    return _cached_client(tuple(os.environ.get(k) for k in keys))


@functools.lru_cache(maxsize=8)
def _cached_client(_env_key: tuple[str | None, ...]) -> Any:
    import boto3

    return boto3.session.Session().client("s3")
