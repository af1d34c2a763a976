"""The serving env on an instance (issue 21): extracted once, and started without `activate`.

Triton extracts a tarball EXECUTION_ENV_PATH again at every server start (python_backend
pb_env.cc), so the bootstrap extracts it once per instance into the shared dir and hands
Triton a folder. From 25.09 the python backend no longer sources the env's bin/activate; the
tests here start the env the way 25.09 does, with the real tritonserver and stub.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import tarfile
from pathlib import Path

import boto3
import pytest
from fixtures.serving import thin_env_tarball

from avatarforge.safe_tar import write_reproducible_tar
from avatarforge.serving import bootstrap

BUILD_PREFIX = "/opt/built/serve-env"  # where a conda env was built, left in its text files

# What conda-pack's bin/conda-unpack does, in small (it is a Python script too, run by the
# env's Python): rewrite the build prefix to the folder the env now sits in, found from its
# own path. It also logs each run, so a test can count extractions.
CONDA_UNPACK = """#!/usr/bin/env python
import os
prefix = os.path.abspath(os.path.dirname(os.path.dirname(__file__)))
path = os.path.join(prefix, "lib", "prefix.txt")
with open(path) as f:
    text = f.read()
with open(path, "w") as f:
    f.write(text.replace({build!r}, prefix))
with open({log!r}, "a") as f:
    f.write(prefix + "\\n")
raise SystemExit({code})
"""


def conda_like_tarball(out: Path, unpack_log: Path, exit_code: int = 0) -> Path:
    """A thin env tarball as conda-pack writes one: a bin/conda-unpack that must run after
    extraction, and a text file that still names the build prefix."""
    thin_env_tarball(out)
    env = out / "thin-env"
    (env / "lib" / "prefix.txt").write_text(BUILD_PREFIX)
    script = env / "bin" / "conda-unpack"
    script.write_text(CONDA_UNPACK.format(build=BUILD_PREFIX, log=str(unpack_log), code=exit_code))
    script.chmod(0o755)
    return write_reproducible_tar(env, out / "conda-env.tar.gz", ".", allow_symlinks=True)


def _instance(shared: Path, source: str, sha256: str = "") -> dict:
    return {
        bootstrap.ENV_SHARED_DIR: str(shared),
        bootstrap.ENV_ENV_SOURCE: source,
        bootstrap.ENV_ENV_SHA256: sha256,
    }


def _ensure(shared: Path, source: str, sha256: str = "") -> str:
    return bootstrap.ensure_env(bootstrap.Instance(_instance(shared, source, sha256)))


def _ensure_in_child(environ: dict) -> str:
    """A model's start in a process of its own, as after a server restart."""
    return bootstrap.ensure_env(bootstrap.Instance(environ))


def _spawn(environ: dict, processes: int = 1) -> list[str]:
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return pool.map(_ensure_in_child, [environ] * processes)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_s3_env_is_extracted_once_per_instance(s3_bucket, tmp_path):
    log = tmp_path / "unpacked.log"
    tarball = conda_like_tarball(tmp_path / "build", log)
    key = "shared/serve-env.tar.gz"
    boto3.client("s3").put_object(Bucket=s3_bucket, Key=key, Body=tarball.read_bytes())
    shared, sha = tmp_path / "shared", _sha256(tarball)
    environ = _instance(shared, f"s3://{s3_bucket}/{key}", sha)

    folder = Path(bootstrap.ensure_env(bootstrap.Instance(environ)))
    # Triton gets a folder in the shared dir, never the tarball (which it would extract again
    # at each start)
    assert folder == shared / "env" / f"serve-{sha[:16]}" and folder.is_dir()
    assert (folder / "bin" / "activate").is_file()
    # conda-unpack ran, once, in the folder the env stays in (not where it was extracted)
    assert (folder / "lib" / "prefix.txt").read_text() == str(folder)
    assert log.read_text().splitlines() == [str(folder)]
    assert os.listdir(shared / "env") == [folder.name]  # no tarball, no staging folder left

    (folder / "sentinel").touch()  # gone if the folder were made again
    made = folder.stat()
    boto3.client("s3").delete_object(Bucket=s3_bucket, Key=key)  # a second fetch would fail
    # a server restart: a new process finds the env where it is
    assert _spawn(environ) == [str(folder)]
    assert (folder.stat().st_ino, folder.stat().st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    assert (folder / "sentinel").exists()
    assert log.read_text().splitlines() == [str(folder)]  # extracted once


def test_parallel_first_starts_extract_a_local_tarball_once(tmp_path):
    log = tmp_path / "unpacked.log"
    tarball = conda_like_tarball(tmp_path / "build", log)
    environ = _instance(tmp_path / "shared", str(tarball))
    paths = _spawn(environ, processes=3)
    assert len(set(paths)) == 1
    folder = Path(paths[0])
    assert folder.parent == tmp_path / "shared" / "env" and folder.name.startswith("serve-")
    assert log.read_text().splitlines() == [str(folder)]
    assert os.listdir(folder.parent) == [folder.name]
    assert tarball.is_file()  # a local tarball is the operator's: left where it is


def test_what_a_killed_start_left_is_swept_and_made_again(tmp_path):
    log = tmp_path / "unpacked.log"
    tarball = conda_like_tarball(tmp_path / "build", log)
    sha = _sha256(tarball)
    env_dir = tmp_path / "shared" / "env"
    folder = env_dir / f"serve-{sha[:16]}"
    # killed after the rename, before conda-unpack finished: no ready file
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "activate").write_text("")
    (env_dir / f".{folder.name}.tmp-dead0001" / "lib").mkdir(parents=True)  # mid-extraction
    (env_dir / f".{folder.name}.tar.gz.tmp-dead0002").write_bytes(b"half a download")
    assert _ensure(tmp_path / "shared", str(tarball), sha) == str(folder)
    assert (folder / "lib" / "prefix.txt").read_text() == str(folder)
    assert os.listdir(env_dir) == [folder.name]


def test_a_tarball_with_the_wrong_sha256_is_refused(tmp_path):
    tarball = conda_like_tarball(tmp_path / "build", tmp_path / "unpacked.log")
    with pytest.raises(bootstrap.BootstrapError, match="sha256 is"):
        _ensure(tmp_path / "shared", str(tarball), "0" * 64)
    assert not (tmp_path / "unpacked.log").exists()


def test_a_failing_conda_unpack_leaves_no_env(tmp_path):
    log = tmp_path / "unpacked.log"
    tarball = conda_like_tarball(tmp_path / "build", log, exit_code=3)
    instance = bootstrap.Instance(_instance(tmp_path / "shared", str(tarball)))
    for attempt in (1, 2):  # not taken for ready by the next start either
        with pytest.raises(bootstrap.BootstrapError, match=r"conda-unpack .* failed \(3\)"):
            bootstrap.ensure_env(instance)
        assert len(log.read_text().splitlines()) == attempt
        assert os.listdir(tmp_path / "shared" / "env") == []


def _hostile(out: Path, outside: Path, kind: str) -> Path:
    """An env tarball (with bin/activate) plus one member that reaches ``outside``."""
    path = out / f"{kind}.tar.gz"

    def member(name, data=b"", **attrs):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        for key, value in attrs.items():
            setattr(info, key, value)
        return info, data

    members = [member("bin", type=tarfile.DIRTYPE, mode=0o755), member("bin/activate", b"")]
    members += {
        "dotdot": [member("lib/../../escaped", b"x")],
        "absolute": [member(str(outside / "escaped"), b"x")],
        "through-a-link": [member("lib", type=tarfile.SYMTYPE, linkname=str(outside)),
                           member("lib/escaped", b"x")],
        "onto-a-link": [member("lib", type=tarfile.SYMTYPE, linkname=str(outside / "escaped")),
                        member("lib", b"x")],
        "hardlink-out": [member("lib", type=tarfile.LNKTYPE, linkname="../../escaped")],
        "device": [member("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)],
    }[kind]  # fmt: skip
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


@pytest.mark.parametrize(
    "kind", ["dotdot", "absolute", "through-a-link", "onto-a-link", "hardlink-out", "device"]
)
def test_an_env_tarball_cannot_write_outside_its_folder(tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    tarball = _hostile(tmp_path, outside, kind)
    shared = tmp_path / "shared"
    with pytest.raises(bootstrap.BootstrapError, match="serving environment"):
        _ensure(shared, str(tarball))
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escaped").exists() and not (shared / "escaped").exists()
    assert os.listdir(shared / "env") == []
