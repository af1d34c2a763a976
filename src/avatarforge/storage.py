"""Fetch and upload files by URI: local paths, ``file://`` and ``s3://bucket/key``.

Downloads are atomic — written to a temporary name beside ``dest``, checked against an
expected sha256 when one is given, then renamed — so a reader never sees a partial file and a
crash leaves only a ``.tmp-*`` file behind. S3 goes through boto3, which reads its endpoint
(``AWS_ENDPOINT_URL``, e.g. a local moto server), region and credentials from the environment.

Published files (model packages) carry their sha256 *with* them, so that no reader ever sees
new bytes beside an old digest (a re-publish is one PUT or one rename, never two):
:func:`publish` uploads in one PUT with S3's own SHA256 checksum (S3 refuses a PUT whose bytes
differ from it) and ``x-amz-meta-sha256``; :func:`publish_local` sets the file's
``user.avatarforge.sha256`` extended attribute before its one rename. :func:`fetch_published`
reads the digest from the same GET response, or from the same open file, as the bytes.
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import logging
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .errors import AvatarforgeError
from .hashing import sha256_file

log = logging.getLogger(__name__)
_CHUNK = 1024 * 1024
MAX_NAME_BYTES = 240  # a file name is at most 255 bytes; fetch() adds a ".tmp-*" suffix to it
# Where a published file's sha256 travels with it (see the module docstring).
DIGEST_METADATA = "sha256"  # S3: x-amz-meta-sha256, beside the object's own ChecksumSHA256
DIGEST_XATTR = "user.avatarforge.sha256"  # a local file's extended attribute
CHECKSUM_SUFFIX = ".sha256"  # sha256sum's file beside a local file: for people, and a fallback
MAX_CHECKSUM_FILE_BYTES = 4096  # '<64 hex>  <name>\n': far less; a larger one is not read
MAX_PUT_BYTES = 5 * 1024**3  # S3's limit on one PUT
_SHA256_LINE = re.compile(r"^([0-9a-fA-F]{64})(?:\s+\*?(\S+))?\s*$")


class StorageError(AvatarforgeError, RuntimeError):
    """A fetch or upload failed; the message names the URI."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The URI names nothing: no such local file or S3 object."""

    status = 404


class ChecksumMismatchError(StorageError):
    """The fetched bytes do not have the expected sha256 (the file is not kept)."""


class UnpublishedError(StorageError):
    """The object came without a sha256 published with it (not written by :func:`publish`)."""


class PreconditionFailedError(StorageError):
    """A conditional write found the object other than it required (S3's 412)."""

    status = 412


class ChecksumFileError(StorageError, ValueError):
    """A ``.sha256`` file is not one: too large, not text, not ``<64 hex> [name]``."""


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


def read_bytes(s3_uri: str, *, max_bytes: int = 1024**2) -> tuple[bytes, str]:
    """A small object's bytes and its ETag (for :func:`write_bytes` ``if_match``);
    :class:`ObjectNotFoundError` when there is none, :class:`StorageError` past ``max_bytes``."""
    target = parse_s3_uri(s3_uri)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response = _s3_client().get_object(Bucket=target.bucket, Key=target.key)
        with response["Body"] as body:
            if int(response.get("ContentLength", 0)) > max_bytes:
                raise StorageError(f"{target}: larger than {max_bytes} bytes")
            return body.read(), response["ETag"]
    except ClientError as exc:
        if _missing(exc):
            raise ObjectNotFoundError(f"{target}: no such object") from exc
        raise StorageError(f"{target}: read failed: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"{target}: read failed: {exc}") from exc


def write_bytes(
    s3_uri: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
) -> str:
    """One PUT of ``data``; returns the new ETag. Conditional (S3's conditional writes, also in
    moto): ``if_none_match`` only if no object has the key, ``if_match`` only if the object's
    ETag is that one; otherwise :class:`PreconditionFailedError` and nothing is written."""
    target = parse_s3_uri(s3_uri)
    from botocore.exceptions import BotoCoreError, ClientError

    extra: dict[str, str] = {}
    if if_none_match:
        extra["IfNoneMatch"] = "*"
    if if_match is not None:
        extra["IfMatch"] = if_match
    try:
        response = _s3_client().put_object(Bucket=target.bucket, Key=target.key, Body=data, **extra)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        # 409 ConditionalRequestConflict: another conditional write to the key was under way
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            raise PreconditionFailedError(f"{target}: {code} ({', '.join(extra)})") from exc
        if if_match is not None and _missing(exc):  # If-Match on a key that is gone
            raise PreconditionFailedError(f"{target}: no object to match") from exc
        raise StorageError(f"{target}: write failed: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"{target}: write failed: {exc}") from exc
    return response["ETag"]


def publish(path: Path, s3_uri: str) -> str:
    """Upload the file ``path`` to ``s3://bucket/key`` in one PUT that carries its sha256 twice:
    as S3's own SHA256 checksum (S3 refuses the PUT if the bytes that arrive differ) and as
    ``x-amz-meta-sha256``. Returns the hex digest.

    One PUT: the object appears whole, digest and all, or not at all; there is no moment in
    which a reader finds new bytes and an old digest (two PUTs, object then ``.sha256``, had
    one). Files over 5 GB, S3's limit for one PUT, are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file to upload")
    if path.stat().st_size > MAX_PUT_BYTES:
        raise StorageError(f"{path}: larger than 5 GB, S3's limit for one PUT")
    target = parse_s3_uri(s3_uri)
    digest = sha256_file(path)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        with open(path, "rb") as body:
            _s3_client().put_object(
                Bucket=target.bucket,
                Key=target.key,
                Body=body,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=base64.b64encode(bytes.fromhex(digest)).decode(),
                Metadata={DIGEST_METADATA: digest},
            )
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"upload of {path} to {target} failed: {exc}") from exc
    return digest


def publish_local(path: Path, dest: Path, digest: str | None = None) -> str:
    """Move the file ``path`` to ``dest`` in one rename, its sha256 (``digest``, computed when
    None) in ``dest``'s extended attribute ``user.avatarforge.sha256``; returns the digest.

    Where the file system (or the platform) has no user extended attributes, only the rename
    happens: readers then fall back to ``<dest>.sha256``, which the caller writes.
    """
    digest = digest or sha256_file(path)
    try:
        os.setxattr(path, DIGEST_XATTR, digest.encode())
    except (AttributeError, OSError) as exc:  # AttributeError: no os.setxattr (macOS)
        log.warning("%s: no extended attribute for its sha256 (%s); readers use %s%s",
                    dest, exc, Path(dest).name, CHECKSUM_SUFFIX)  # fmt: skip
    os.replace(path, dest)
    return digest


def fetch_published(uri: str, dest: Path, *, name: str | None = None) -> str:
    """Copy what ``uri`` names to ``dest`` atomically, checked against the sha256 published
    with it; returns that digest. ``name``: what messages call it (default: ``uri``).

    S3: one GET (``ChecksumMode=ENABLED``) gives the bytes and, in the same response, the
    object's full-object ChecksumSHA256 (or, for a multipart upload, ``x-amz-meta-sha256``).
    Local: the file is opened once; its ``user.avatarforge.sha256`` attribute, else the
    ``.sha256`` file beside it (the fallback has the old two-file window), belongs to the bytes
    read. Raises :class:`ObjectNotFoundError`, :class:`UnpublishedError` (no digest came with
    it), :class:`ChecksumFileError` (a ``.sha256`` file that is not one) or
    :class:`ChecksumMismatchError`; nothing is left at ``dest`` then.
    """
    name = name or uri
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if uri.startswith("s3://"):
            expected, actual = _download_s3_published(parse_s3_uri(uri), tmp, name)
        else:
            expected, actual = _copy_local_published(local_path(uri), tmp, name)
        if actual != expected:
            raise ChecksumMismatchError(
                f"{name}: sha256 {actual[:16]}... is not the published {expected[:16]}... "
                "(corrupted or altered in transit or at rest)"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return expected


def read_sha256_file(path: Path, *, name: str | None = None) -> str:
    """The hex digest (lower case) in a sha256 file (sha256sum's format, or the bare digest);
    :class:`ChecksumFileError` for anything else. At most 4 KiB of it is read."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CHECKSUM_FILE_BYTES + 1)
    except FileNotFoundError:
        raise UnpublishedError(f"{name or path}: no such sha256 file") from None
    return _parse_sha256(raw, name or str(path))


def _parse_sha256(raw: bytes, name: str) -> str:
    match = None
    if len(raw) <= MAX_CHECKSUM_FILE_BYTES:
        match = _SHA256_LINE.match(raw.decode("utf-8", "replace").strip())
    if match is None:
        raise ChecksumFileError(f"{name}: not a sha256 file (expected '<64 hex>  <file name>')")
    return match.group(1).lower()


def _published_digest(response: dict[str, Any], name: str) -> str:
    """The sha256 a GetObject response carries: S3's full-object checksum, else our metadata."""
    checksum = response.get("ChecksumSHA256") or ""
    if checksum and "-" not in checksum and response.get("ChecksumType") != "COMPOSITE":
        try:
            raw = base64.b64decode(checksum, validate=True)
        except ValueError:
            raw = b""
        if len(raw) == 32:
            return raw.hex()
    meta = str((response.get("Metadata") or {}).get(DIGEST_METADATA, "")).lower()
    if re.fullmatch(r"[0-9a-f]{64}", meta):
        return meta
    raise UnpublishedError(
        f"{name}: published without its sha256 (neither S3's SHA256 checksum nor "
        f"x-amz-meta-{DIGEST_METADATA}); publish it with avatarforge (package --upload, the "
        "training service), which sends both with the object"
    )


def _download_s3_published(source: S3Uri, tmp: Path, name: str) -> tuple[str, str]:
    from botocore.exceptions import BotoCoreError, ClientError, FlexibleChecksumError

    try:
        response = _s3_client().get_object(
            Bucket=source.bucket, Key=source.key, ChecksumMode="ENABLED"
        )
    except ClientError as exc:
        if _missing(exc):
            raise ObjectNotFoundError(f"{name}: no such object") from exc
        raise StorageError(f"{source}: download failed: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"{source}: download failed: {exc}") from exc
    body = response["Body"]
    try:
        expected = _published_digest(response, name)
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for chunk in body.iter_chunks(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except FlexibleChecksumError as exc:  # botocore checks S3's checksum as the body streams
        raise ChecksumMismatchError(
            f"{name}: the bytes do not match the published sha256 (corrupted in transit)"
        ) from exc
    except BotoCoreError as exc:
        raise StorageError(f"{source}: download failed: {exc}") from exc
    finally:
        body.close()
    return expected, digest.hexdigest()


def _copy_local_published(source: Path, tmp: Path, name: str) -> tuple[str, str]:
    try:
        src = open(source, "rb")  # noqa: SIM115 (closed by `with src` below)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise ObjectNotFoundError(f"{name}: no such file") from exc
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        raise ObjectNotFoundError(f"{name}: no such file") from exc
    with src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise ObjectNotFoundError(f"{name}: no such file")
        expected = _xattr_digest(src.fileno())
        if expected is None:  # copied without its attribute, or no xattrs here: the old way
            checksum = source.with_name(source.name + CHECKSUM_SUFFIX)
            expected = read_sha256_file(checksum, name=name + CHECKSUM_SUFFIX)
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    return expected, digest.hexdigest()


def _xattr_digest(fd: int) -> str | None:
    try:
        value = os.getxattr(fd, DIGEST_XATTR).decode("ascii", "replace").lower()
    except (AttributeError, OSError):  # no such attribute, no xattrs on this file system/OS
        return None
    return value if re.fullmatch(r"[0-9a-f]{64}", value) else None


def _missing(exc: Any) -> bool:
    return str(exc.response.get("Error", {}).get("Code", "")) in (
        "404", "NoSuchKey", "NoSuchBucket", "NotFound"
    )  # fmt: skip


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
