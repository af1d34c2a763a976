"""storage.fetch / upload against local files and a real moto S3 server."""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import shutil
import threading
from pathlib import Path
from typing import ClassVar

import boto3
import pytest

from avatarforge.storage import (
    DIGEST_XATTR,
    ChecksumMismatchError,
    ObjectNotFoundError,
    StorageError,
    UnpublishedError,
    fetch,
    fetch_prefix,
    fetch_published,
    join_uri,
    parse_s3_uri,
    publish,
    publish_local,
    upload,
)
from avatarforge.testing.aws_local import dummy_aws_env

pytestmark = pytest.mark.integration


@pytest.mark.smoke
def test_parse_and_join_uris() -> None:
    uri = parse_s3_uri("s3://bucket/a/b.tar.gz")
    assert (uri.bucket, uri.key, str(uri)) == ("bucket", "a/b.tar.gz", "s3://bucket/a/b.tar.gz")
    for bad in ("s3://bucket", "s3:///key", "http://x/y", "bucket/key"):
        with pytest.raises(ValueError, match="not an s3://bucket/key URI"):
            parse_s3_uri(bad)
    assert join_uri("s3://b/prefix/", "x.tar.gz") == "s3://b/prefix/x.tar.gz"
    assert join_uri("/data/models", "x.tar.gz") == "/data/models/x.tar.gz"


@pytest.mark.smoke
def test_fetch_local_path_and_file_uri(tmp_path: Path) -> None:
    src = tmp_path / "src" / "a b.bin"
    src.parent.mkdir()
    src.write_bytes(b"payload")
    digest = hashlib.sha256(b"payload").hexdigest()
    assert fetch(str(src), tmp_path / "out" / "1.bin", sha256=digest).read_bytes() == b"payload"
    uri = "file://" + str(src).replace(" ", "%20")
    assert fetch(uri, tmp_path / "out" / "2.bin").read_bytes() == b"payload"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["1.bin", "2.bin"]


@pytest.mark.smoke
def test_fetch_errors_leave_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    out = tmp_path / "out"
    with pytest.raises(ObjectNotFoundError, match="no such file"):
        fetch(str(tmp_path / "missing.bin"), out / "x.bin")
    with pytest.raises(ChecksumMismatchError, match="expected 00"):
        fetch(str(src), out / "x.bin", sha256="00" * 32)
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        fetch("https://example.com/x", out / "x.bin")
    assert list(out.iterdir()) == []


@pytest.mark.smoke
def test_fetch_keeps_old_file_until_new_one_is_complete(tmp_path: Path) -> None:
    dest = tmp_path / "x.bin"
    dest.write_bytes(b"old")
    with pytest.raises(ChecksumMismatchError):
        fetch(str(dest), tmp_path / "y.bin", sha256="11" * 32)
    src = tmp_path / "new.bin"
    src.write_bytes(b"new")
    with pytest.raises(ChecksumMismatchError):
        fetch(str(src), dest, sha256="11" * 32)
    assert dest.read_bytes() == b"old"


def test_s3_round_trip_through_moto(tmp_path: Path, s3_bucket: str) -> None:
    src = tmp_path / "alice.tar.gz"
    src.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 100)
    uri = upload(src, f"s3://{s3_bucket}/mme/alice.tar.gz")
    assert uri == f"s3://{s3_bucket}/mme/alice.tar.gz"
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["mme/alice.tar.gz"]
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    got = fetch(uri, tmp_path / "down" / "alice.tar.gz", sha256=digest)
    assert got.read_bytes() == src.read_bytes()
    with pytest.raises(ChecksumMismatchError):
        fetch(uri, tmp_path / "down" / "bad.tar.gz", sha256="ab" * 32)
    assert sorted(p.name for p in (tmp_path / "down").iterdir()) == ["alice.tar.gz"]


def test_s3_missing_object_and_bucket(tmp_path: Path, s3_bucket: str) -> None:
    with pytest.raises(ObjectNotFoundError, match="no such object"):
        fetch(f"s3://{s3_bucket}/nope.tar.gz", tmp_path / "x")
    with pytest.raises(ObjectNotFoundError):
        fetch("s3://no-such-bucket/x.tar.gz", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_a_published_object_carries_its_sha256_in_the_same_put(tmp_path, s3_bucket) -> None:
    s3 = boto3.client("s3")
    uri = f"s3://{s3_bucket}/mme/alice.tar.gz"
    versions = []
    for i in range(2):  # published, then published again with other bytes
        src = tmp_path / f"v{i}.tar.gz"
        src.write_bytes(bytes([i]) * 300_000)
        versions.append(hashlib.sha256(src.read_bytes()).hexdigest())
        assert publish(src, uri) == versions[-1]
    head = s3.head_object(Bucket=s3_bucket, Key="mme/alice.tar.gz", ChecksumMode="ENABLED")
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == versions[1]  # S3's own checksum
    assert head["Metadata"] == {"sha256": versions[1]}
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]] == [
        "mme/alice.tar.gz"
    ]  # one object: no .sha256 PUT after it
    # a stale .sha256 beside it is no reader's business
    s3.put_object(Bucket=s3_bucket, Key="mme/alice.tar.gz.sha256", Body=versions[0].encode())
    got = tmp_path / "got.tar.gz"
    assert fetch_published(uri, got) == versions[1]
    assert got.read_bytes() == (tmp_path / "v1.tar.gz").read_bytes()


def test_fetch_published_refuses_what_came_without_its_digest_or_with_another(
    tmp_path, s3_bucket
) -> None:
    s3 = boto3.client("s3")
    src = tmp_path / "x.bin"
    src.write_bytes(b"x" * 1000)
    upload(src, f"s3://{s3_bucket}/plain")  # a plain PUT
    with pytest.raises(UnpublishedError, match="plain: published without its sha256"):
        fetch_published(f"s3://{s3_bucket}/plain", tmp_path / "out" / "a", name="plain")
    s3.put_object(Bucket=s3_bucket, Key="lying", Body=b"y", Metadata={"sha256": "ab" * 32})
    with pytest.raises(ChecksumMismatchError, match="is not the published abababab"):
        fetch_published(f"s3://{s3_bucket}/lying", tmp_path / "out" / "b")
    # a multipart upload's checksum is a checksum of its parts: its metadata is used
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 40_000)  # 10 MB: past boto3's multipart threshold
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    s3.upload_file(str(big), s3_bucket, "multi", ExtraArgs={
        "ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": digest}})  # fmt: skip
    assert fetch_published(f"s3://{s3_bucket}/multi", tmp_path / "out" / "c") == digest
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c"]


@pytest.mark.smoke
def test_publish_local_is_one_rename_with_the_digest_in_an_attribute(tmp_path) -> None:
    dest = tmp_path / "alice.tar.gz"
    for i in range(2):
        tmp = tmp_path / f".tmp{i}"
        tmp.write_bytes(bytes([i]) * 1000)
        digest = publish_local(tmp, dest)
        assert not tmp.exists() and os.getxattr(dest, DIGEST_XATTR).decode() == digest
    (tmp_path / "alice.tar.gz.sha256").write_text("00" * 32 + "  alice.tar.gz\n")  # stale
    assert fetch_published(str(dest), tmp_path / "got") == digest
    # copied without its attribute: the .sha256 beside it is the published digest
    shutil.copy(dest, tmp_path / "copy.tar.gz")
    with pytest.raises(UnpublishedError, match="copy.tar.gz.sha256: no such sha256 file"):
        fetch_published(str(tmp_path / "copy.tar.gz"), tmp_path / "got2")
    (tmp_path / "copy.tar.gz.sha256").write_text(digest.upper() + "\n")
    assert fetch_published(str(tmp_path / "copy.tar.gz"), tmp_path / "got2") == digest


def test_moto_state_is_reset_between_tests(aws_env: str) -> None:
    assert boto3.client("s3").list_buckets()["Buckets"] == []


def test_fetch_prefix_downloads_an_upload_folder(tmp_path: Path, s3_bucket: str) -> None:
    s3 = boto3.client("s3")
    objects = {"u/alice/a.jpg": b"a", "u/alice/b.png": b"bb", "u/alice2/x.jpg": b"x"}
    for key, body in objects.items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=body)
    got = fetch_prefix(f"s3://{s3_bucket}/u/alice", tmp_path / "in")  # not u/alice2/
    assert [(p.name, p.read_bytes()) for p in got] == [("a.jpg", b"a"), ("b.png", b"bb")]
    with pytest.raises(StorageError, match=r"u/alice/b\.png: 0 MiB, more than 0 MiB"):
        fetch_prefix(f"s3://{s3_bucket}/u/alice/", tmp_path / "x", max_object_bytes=1)
    with pytest.raises(StorageError, match="2 objects, more than the limit of 1"):
        fetch_prefix(f"s3://{s3_bucket}/u/alice/", tmp_path / "x", max_objects=1)
    with pytest.raises(ObjectNotFoundError, match="no objects"):
        fetch_prefix(f"s3://{s3_bucket}/u/carol/", tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before any download


def test_preprocess_reads_selfies_from_an_s3_prefix(tmp_path: Path, s3_bucket: str) -> None:
    from typer.testing import CliRunner

    from avatarforge.cli import app
    from avatarforge.preprocess import load_manifest
    from avatarforge.testing.samples import write_samples

    photos = write_samples(tmp_path / "photos")[:5]
    for photo in photos:
        upload(photo, f"s3://{s3_bucket}/uploads/alice/{photo.name}")
    out = tmp_path / "ds"
    args = ["preprocess", f"s3://{s3_bucket}/uploads/alice/", str(out), "--backgrounds", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert sorted(manifest.kept_sources) == sorted(p.name for p in photos)
    missing = CliRunner().invoke(app, ["preprocess", f"s3://{s3_bucket}/nobody/", str(out)])
    assert missing.exit_code == 1 and "no objects under this prefix" in missing.output


class _ThrottlingS3(http.server.BaseHTTPRequestHandler):
    """S3 that answers 503 SlowDown to the first ``throttle`` requests, then serves one object."""

    throttle = 2
    body = b"the object's bytes"
    seen: ClassVar[list[str]] = []

    def log_message(self, *args) -> None:
        pass

    def _answer(self, with_body: bool) -> None:
        type(self).seen.append(self.command)
        if len(self.seen) <= self.throttle:
            error = b"<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            if with_body:
                self.wfile.write(error)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
        self.send_header("Last-Modified", "Thu, 26 Nov 2026 00:00:00 GMT")
        self.end_headers()
        if with_body:
            self.wfile.write(self.body)

    def do_HEAD(self) -> None:
        self._answer(False)

    def do_GET(self) -> None:
        self._answer(True)


@pytest.fixture
def throttling_s3(monkeypatch):
    _ThrottlingS3.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ThrottlingS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for key, value in dummy_aws_env(f"http://127.0.0.1:{server.server_address[1]}").items():
        monkeypatch.setenv(key, value)
    try:
        yield _ThrottlingS3
    finally:
        server.shutdown()


def test_throttling_is_retried_with_backoff_by_botocore(throttling_s3, tmp_path):
    throttling_s3.throttle = 2
    path = fetch("s3://bucket/key.bin", tmp_path / "key.bin")
    assert path.read_bytes() == throttling_s3.body
    assert len(throttling_s3.seen) == 4  # two SlowDowns, then HEAD and GET


def test_throttling_that_does_not_end_is_a_clear_failure(throttling_s3, tmp_path, monkeypatch):
    throttling_s3.throttle = 10**6
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # the environment's setting wins
    with pytest.raises(StorageError, match=r"503.*reached max retries: 2"):
        fetch("s3://bucket/key.bin", tmp_path / "key.bin")
    assert len(throttling_s3.seen) == 3
    assert list(tmp_path.iterdir()) == []  # nothing half-written
