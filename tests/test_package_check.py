"""A served package is exactly what the packager writes: anything else is refused by name.

Each hostile package below is a real package with one change, repacked and given a matching
sha256 file, so that only the check under test can refuse it. Before this check, every one of
them was served (a native backend shipped in the tarball ran inside tritonserver).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.mme import USERS, output_of, scale_request

from avatarforge import storage
from avatarforge.mme import ModelLoadError, MultiModelLoader
from avatarforge.mme.front import reply_for
from avatarforge.safe_tar import UnsafeArchiveError, safe_extract, write_reproducible_tar
from avatarforge.serving.config import ServingConfig
from avatarforge.serving.package import PackageError, package_user, unpack_package
from avatarforge.serving.package_check import (
    PackageRefusedError,
    check_package,
    checksum_path,
    write_checksum,
)


@pytest.fixture(scope="module")
def genuine(trained_adapter, tiny_base, tmp_path_factory) -> Path:
    return package_user("mallory", trained_adapter, tmp_path_factory.mktemp("pkg"), base=tiny_base)


def tampered(genuine: Path, out: Path, change: Callable[[Path], None]) -> Path:
    """``genuine`` with ``change`` applied to its model folder, repacked with a fresh sha256."""
    work = out / "work"
    safe_extract(genuine, work)
    change(work / "mallory")
    out_dir = out / "pkg"
    out_dir.mkdir()
    archive = write_reproducible_tar(work / "mallory", out_dir / genuine.name, arcname="mallory")
    write_checksum(archive)
    return archive


def _edit(rel: str, fn: Callable[[str], str]) -> Callable[[Path], None]:
    def change(model: Path) -> None:
        path = model / rel
        path.write_text(fn(path.read_text()))

    return change


def _shared_base(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(model: Path) -> None:
        path = model / "1" / "shared_base.json"
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data))

    return change


def _param(name: str, value: str) -> str:
    return f'parameters {{\n  key: "{name}"\n  value {{\n    string_value: "{value}"\n  }}\n}}\n'


def _set(shared_base: dict, name: str, value: str) -> None:
    shared_base["parameters"][name] = {"string_value": value}


def _add_file(rel: str, data: bytes) -> Callable[[Path], None]:
    def change(model: Path) -> None:
        (model / rel).write_bytes(data)

    return change


def _flip_byte(rel: str) -> Callable[[Path], None]:
    def change(model: Path) -> None:
        raw = bytearray((model / rel).read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (model / rel).write_bytes(bytes(raw))

    return change


HOSTILE = {
    # instance settings from a tarball's config won over the instance's environment
    "config parameter": (
        _edit("config.pbtxt", lambda t: t + _param("AVATARFORGE_SHARED_DIR", "/tmp/mine")),
        "config.pbtxt is not the one",
    ),
    "env path in config": (
        _edit("config.pbtxt", lambda t: t + _param("EXECUTION_ENV_PATH", "$$TRITON_MODEL_DIR")),
        "config.pbtxt is not the one",
    ),
    "other backend": (
        _edit("config.pbtxt", lambda t: t.replace('backend: "python"', 'backend: "evil"')),
        "config.pbtxt is not the one",
    ),
    "default_model_filename": (
        _edit("config.pbtxt", lambda t: t + 'default_model_filename: "other.py"\n'),
        "config.pbtxt is not the one",
    ),
    "native library": (_add_file("1/libtriton_evil.so", b"\x7fELF"), "never writes: 1/libtriton"),
    "model.py changed": (
        _edit("1/model.py", lambda t: t + "\nimport os  # anything at all\n"),
        "1/model.py is not the one this avatarforge packages",
    ),
    "bootstrap changed": (
        _edit("1/avatarforge_bootstrap.py", lambda t: t.replace("1800.0", "1.0")),
        "1/avatarforge_bootstrap.py is not the one",
    ),
    "env path in shared base": (
        _shared_base(lambda d: _set(d, "EXECUTION_ENV_PATH", "/x")),
        "shared_base.json is not the one",
    ),
    # the shared base's limits are the instance's: a package carries none
    "a setting of the shared base": (
        _shared_base(lambda d: _set(d, "MAX_REQUEST_COST", "1000000")),
        "shared_base.json is not the one",
    ),
    "adapter weights altered": (
        _flip_byte("1/adapter/pytorch_lora_weights.safetensors"),
        "does not match the sha256 recorded",
    ),
    "adapter missing": (
        lambda m: (m / "1/adapter/avatarforge_adapter.json").unlink(),
        "incomplete, missing 1/adapter/avatarforge_adapter.json",
    ),
}  # fmt: skip


def test_the_genuine_package_and_its_sha256_are_accepted(genuine, tmp_path):
    digest = hashlib.sha256(genuine.read_bytes()).hexdigest()
    assert checksum_path(genuine).read_text() == f"{digest}  mallory.tar.gz\n"  # sha256sum's
    model = unpack_package(genuine, tmp_path / "staging")
    assert model.name == "mallory"
    check_package(model, "mallory")  # what the loader runs: no error


@pytest.mark.parametrize("case", list(HOSTILE))
def test_anything_the_packager_never_writes_is_refused_by_name(genuine, tmp_path, case):
    change, message = HOSTILE[case]
    archive = tampered(genuine, tmp_path, change)
    with pytest.raises(PackageRefusedError, match=message.replace("(", r"\(")):
        unpack_package(archive, tmp_path / "staging")
    assert not (tmp_path / "staging").exists()  # refused: nothing left behind


def test_a_package_under_another_users_name_is_refused(genuine, tmp_path):
    shutil.copy(genuine, tmp_path / "alice.tar.gz")
    write_checksum(tmp_path / "alice.tar.gz")
    with pytest.raises(PackageError, match="expected one folder alice/"):
        unpack_package(tmp_path / "alice.tar.gz", tmp_path / "staging")


def test_no_sha256_file_or_a_different_one_is_refused(genuine, tmp_path):
    copy = tmp_path / "mallory.tar.gz"
    shutil.copy(genuine, copy)
    with pytest.raises(PackageError, match="no sha256 published with it"):
        unpack_package(copy, tmp_path / "staging")
    shutil.copy(checksum_path(genuine), checksum_path(copy))
    raw = bytearray(copy.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit in transit
    copy.write_bytes(bytes(raw))
    with pytest.raises(PackageRefusedError, match="is not the published"):
        unpack_package(copy, tmp_path / "staging")


def test_a_corrupt_gzip_stream_is_refused_even_with_a_matching_sha256(genuine, tmp_path):
    # a member's byte changed under the gzip CRC: tarfile alone extracts it as is
    raw = gzip.decompress(genuine.read_bytes())
    at = raw.index(b"TritonPythonModel")
    changed = raw[:at] + b"TritonPythonModeX" + raw[at + 17 :]
    bad = tmp_path / "mallory.tar.gz"
    bad.write_bytes(gzip.compress(changed, mtime=0)[:-8] + gzip.compress(raw, mtime=0)[-8:])
    write_checksum(bad)  # the packager's own sha256 of a bad archive: only the CRC can tell
    with pytest.raises(UnsafeArchiveError, match="CRC check failed"):
        unpack_package(bad, tmp_path / "staging")


@pytest.mark.integration
def test_the_loader_refuses_a_tampered_package_and_keeps_the_healthy_model(
    sagemaker_server, mme_source, genuine, tmp_path
):
    from avatarforge.mme import MMEConfig, MultiModelLoader

    source = tmp_path / "source"
    source.mkdir()
    for name in ("alice.tar.gz", "alice.tar.gz.sha256"):
        shutil.copy(mme_source / name, source / name)
    hostile = tampered(genuine, tmp_path, HOSTILE["native library"][0])
    for path in (hostile, checksum_path(hostile)):
        shutil.copy(path, source / path.name)

    def check(model_dir: Path, name: str) -> None:  # the scale model alice is a test double
        if name != "alice":
            check_package(model_dir, name)

    loader = MultiModelLoader(
        sagemaker_server.sagemaker_url, str(source), tmp_path / "models",
        MMEConfig(max_loaded=1), check_model=check,
    )  # fmt: skip
    try:
        assert output_of(loader.invoke("alice.tar.gz", scale_request([1.0]))) == [USERS["alice"]]
        with pytest.raises(ModelLoadError, match="libtriton_evil.so") as err:
            loader.invoke("mallory.tar.gz", scale_request([1.0]))
        assert err.value.status == 424
        assert loader.loaded() == ["alice.tar.gz"]  # max_loaded=1: refused before any eviction
        assert len(list((tmp_path / "models").iterdir())) == 1  # the refused one left nothing
    finally:
        loader.unload_all()


# ------------------------------------- what a refused package tells the client (#22), and how


def _metadata(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        path = model / "1" / "adapter" / "avatarforge_adapter.json"
        data = json.loads(path.read_text())
        new = change(data)
        path.write_bytes(new if isinstance(new, bytes) else json.dumps(data).encode())

    return edit


HOSTILE_METADATA = {
    # was a ValueError and HTTP 500: dict("x")
    "extra not an object": (_metadata(lambda d: d.update(extra="x")), "extra must be a JSON"),
    # was a RecursionError and HTTP 500
    "deeply nested": (
        _metadata(lambda d: b'{"extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "avatarforge_adapter.json is not adapter metadata \\(nested too deeply\\)",
    ),
    # was a 424 naming the server's .staging-... folder
    "bad UTF-8": (_metadata(lambda d: b'{"base_id": "\xff"}'), "is not valid JSON"),
    "upper-case weights sha256": (
        _metadata(lambda d: d.update(weights_sha256=d["weights_sha256"].upper())),
        "weights_sha256 must be 64 lower-case hex digits",
    ),
    "a number for a string": (_metadata(lambda d: d.update(base_hash=5)), "base_hash must be a"),
    "a 2 MiB metadata file": (
        _metadata(lambda d: d.update(extra={"x": "y" * 2 * 2**20})),
        "1/adapter/avatarforge_adapter.json is larger than any the packager writes",
    ),
}


def _refusal(loader: MultiModelLoader, target: str) -> tuple[int, str]:
    """The status and message the MME answers for ``target``, which must be refused."""
    with pytest.raises(Exception) as info:  # what it is, the reply says
        loader.load(target)
    reply = reply_for(info.value)
    return reply.status, json.loads(reply.body)["message"]


@pytest.fixture
def offline_loader(tmp_path):
    """A loader whose Triton is never reached: every package here is refused before it."""
    source = tmp_path / "source"
    source.mkdir()
    loader = MultiModelLoader("http://127.0.0.1:9", str(source), tmp_path / "models")
    return loader, source


@pytest.mark.parametrize("case", list(HOSTILE_METADATA))
def test_hostile_adapter_metadata_is_a_424_naming_the_field_and_no_server_path(
    genuine, tmp_path, offline_loader, case
):
    change, message = HOSTILE_METADATA[case]
    archive = tampered(genuine, tmp_path, change)
    loader, source = offline_loader
    for path in (archive, checksum_path(archive)):
        shutil.copy(path, source / path.name)
    status, text = _refusal(loader, "mallory.tar.gz")
    assert status == 424, text
    assert re.search(message, text), text
    assert str(tmp_path) not in text and ".staging-" not in text, text
    assert list(loader.root.iterdir()) == []  # nothing left behind


def test_refusals_name_the_target_model_not_the_source_or_staging_folder(
    genuine, tmp_path, offline_loader
):
    loader, source = offline_loader
    status, text = _refusal(loader, "nobody.tar.gz")  # was: "... not found in /abs/source"
    assert status == 404 and "'nobody.tar.gz' not found" in text and str(source) not in text
    # an archive refused by safe_extract: was "/abs/.staging-<hash>/archive.tar.gz: ..."
    evil = source / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("../../x"))
    write_checksum(evil)
    status, text = _refusal(loader, "evil.tar.gz")
    assert status == 424 and text.startswith("evil.tar.gz: path traversal"), text
    # a sha256 file that is not one (upper case is one: sha256sum -c reads it)
    shutil.copy(genuine, source / "mallory.tar.gz")
    checksum_path(source / "mallory.tar.gz").write_text("not a digest\n")
    status, text = _refusal(loader, "mallory.tar.gz")
    assert status == 424 and text.startswith("mallory.tar.gz.sha256: not a sha256 file"), text
    assert str(tmp_path) not in text


def test_an_upper_case_sha256_file_is_read_as_sha256sum_reads_it(genuine, tmp_path):
    copy = tmp_path / "pkg" / "mallory.tar.gz"
    copy.parent.mkdir()
    shutil.copy(genuine, copy)
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    checksum_path(copy).write_text(f"{digest.upper()}  mallory.tar.gz\n")
    assert unpack_package(copy, tmp_path / "staging").name == "mallory"


def test_a_huge_sha256_file_is_refused_without_reading_it(genuine, tmp_path, offline_loader):
    # was: read whole before its length was checked (1.5 GB: MemoryError, HTTP 500)
    copy = tmp_path / "pkg" / "mallory.tar.gz"
    copy.parent.mkdir()
    shutil.copy(genuine, copy)
    with open(checksum_path(copy), "wb") as f:
        f.truncate(300 * 2**20)  # sparse: no disk, but 300 MiB to whoever reads it
    tracemalloc.start()
    try:
        with pytest.raises(PackageRefusedError, match="not a sha256 file"):
            unpack_package(copy, tmp_path / "staging")
        loader, source = offline_loader
        for path in (copy, checksum_path(copy)):
            os.link(path, source / path.name)
        status, text = _refusal(loader, "mallory.tar.gz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 424 and "not a sha256 file" in text
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB"


# ---------------------------------------------- the digest travels with the package (#22)


def test_a_republished_package_is_checked_with_its_own_digest_not_a_stale_file(
    genuine, trained_adapter, tiny_base, tmp_path
):
    out = tmp_path / "out"
    first = package_user("mallory", trained_adapter, out, base=tiny_base)
    stale = checksum_path(first).read_text()
    again = package_user(
        "mallory", trained_adapter, out, base=tiny_base, serving=ServingConfig(max_batch_size=2)
    )
    assert again == first and checksum_path(first).read_text() != stale  # other bytes
    # the moment between the old two renames: the new tarball, the old .sha256 beside it
    checksum_path(first).write_text(stale)
    assert (
        os.getxattr(first, storage.DIGEST_XATTR).decode()
        == hashlib.sha256(first.read_bytes()).hexdigest()
    )
    model = unpack_package(first, tmp_path / "staging")  # was: "is not the published"
    assert "max_batch_size: 2" in (model / "config.pbtxt").read_text()
    # altered in place after it was published: its attribute no longer matches
    with open(first, "r+b") as f:
        f.seek(100)
        f.write(b"\0")
    with pytest.raises(PackageRefusedError, match="is not the published"):
        unpack_package(first, tmp_path / "staging2")


@pytest.mark.integration
def test_the_loader_uses_the_digest_that_came_with_the_model_not_a_stale_file(
    sagemaker_server, mme_source, s3_bucket, tmp_path
):
    from avatarforge.serving.package import upload_package

    alice, bob = mme_source / "alice.tar.gz", mme_source / "bob.tar.gz"

    def serves_alice(source: str, root: Path) -> None:
        loader = MultiModelLoader(sagemaker_server.sagemaker_url, source, root, check_model=None)
        try:  # was: 424 "sha256 ... is not the published ..."
            assert output_of(loader.invoke("alice.tar.gz", scale_request([1.0]))) == [
                USERS["alice"]
            ]
        finally:
            loader.unload_all()

    # S3: alice in one PUT with her digest; beside her, a .sha256 naming other bytes (what a
    # reader found between the two PUTs of a re-publish, object then .sha256)
    prefix = f"s3://{s3_bucket}/mme/"
    upload_package(alice, prefix + "alice.tar.gz")
    storage.upload(checksum_path(bob), prefix + "alice.tar.gz.sha256")
    serves_alice(prefix, tmp_path / "models-s3")
    # locally: one rename with the digest in the file's attribute, a stale .sha256 beside it
    local = tmp_path / "source"
    local.mkdir()
    shutil.copy(alice, local / ".alice.tar.gz.tmp")
    storage.publish_local(local / ".alice.tar.gz.tmp", local / "alice.tar.gz")
    shutil.copy(checksum_path(bob), checksum_path(local / "alice.tar.gz"))
    serves_alice(str(local), tmp_path / "models-local")
    # an object put without its digest (a plain PUT) is refused, whatever lies beside it
    storage.upload(bob, prefix + "bob.tar.gz")
    storage.upload(checksum_path(bob), prefix + "bob.tar.gz.sha256")
    loader = MultiModelLoader(sagemaker_server.sagemaker_url, prefix, tmp_path / "models-x")
    status, text = _refusal(loader, "bob.tar.gz")
    assert status == 424 and text.startswith("bob.tar.gz: published without its sha256"), text
