"""A served package is exactly what the packager writes: anything else is refused by name.

Each hostile package below is a real package with one change, repacked and given a matching
sha256 file, so that only the check under test can refuse it. Before this check, every one of
them was served (a native backend shipped in the tarball ran inside tritonserver).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.mme import USERS, output_of, scale_request

from avatarforge.mme import ModelLoadError
from avatarforge.safe_tar import UnsafeArchiveError, safe_extract, write_reproducible_tar
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
    with pytest.raises(PackageError, match="no mallory.tar.gz.sha256 beside it"):
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
