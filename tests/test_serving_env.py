"""The serving env on an instance (issue 21): extracted once, and started without `activate`.

Triton extracts a tarball EXECUTION_ENV_PATH again at every server start (python_backend
pb_env.cc), so the bootstrap extracts it once per instance into the shared dir and hands
Triton a folder. From 25.08 (checked: r25.08 to r25.12; the issue says 25.09, our deploy
default) the python backend no longer sources the env's bin/activate; the tests here start the
env the way 25.09 does, with the real tritonserver and stub.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
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


def test_a_download_whose_extraction_was_killed_is_not_fetched_again(tmp_path):
    tarball = conda_like_tarball(tmp_path / "build", tmp_path / "unpacked.log")
    sha = _sha256(tarball)
    kept = tmp_path / "shared" / "env" / f"serve-{sha[:16]}.tar.gz"
    kept.parent.mkdir(parents=True)
    shutil.copy(tarball, kept)  # downloaded whole (and checked), then the start was killed
    # no bucket, no credentials: a download would fail
    folder = _ensure(tmp_path / "shared", "s3://no-such-bucket/serve-env.tar.gz", sha)
    assert (Path(folder) / bootstrap.ENV_READY_FILE).is_file()
    assert os.listdir(kept.parent) == [Path(folder).name]


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


# ---------------------------------------------------------------- started as Triton 25.09 does

CHECK_SCRIPT = Path(__file__).resolve().parents[1] / "conda_envs" / "check_packed_env.py"

# Triton 2.51 (here) starts the stub with `bash -c "source <env>/bin/activate && exec env
# LD_LIBRARY_PATH=<env>/lib:$LD_LIBRARY_PATH <stub> ..."` (python_backend r24.10
# src/stub_launcher.cc:362-375). 25.09 sources nothing: it sets VIRTUAL_ENV, PATH and
# LD_LIBRARY_PATH itself and execs the stub (r25.09 stub_launcher.cc:405-470, pb_utils.cc:361-438).
# This activate stands in for the env's own: it throws nothing of the env's activate in and sets
# exactly what 25.09 sets, so the real 2.51 server and stub start the env as 25.09 would.
ACTIVATE_LIKE_25_09 = """# stand-in: what python_backend 25.09 sets instead of sourcing bin/activate
VIRTUAL_ENV={folder}
export VIRTUAL_ENV
export VIRTUAL_ENV_PROMPT="($VIRTUAL_ENV)"
export PATH="$VIRTUAL_ENV/bin${{PATH+:$PATH}}"
export LD_LIBRARY_PATH="$VIRTUAL_ENV/lib${{LD_LIBRARY_PATH+:$LD_LIBRARY_PATH}}"
unset PYTHONHOME
"""
_SET_BY_25_09 = ("VIRTUAL_ENV", "VIRTUAL_ENV_PROMPT", "PATH", "LD_LIBRARY_PATH", "PYTHONHOME")


@pytest.fixture(scope="module")
def check_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_packed_env", CHECK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def activate_like_25_09(folder: Path) -> None:
    activate = folder / "bin" / "activate"
    activate.unlink(missing_ok=True)  # may be a hard link into the env it was copied from
    activate.write_text(ACTIVATE_LIKE_25_09.format(folder=shlex.quote(str(folder))))


def test_the_activate_stand_in_gives_the_stub_what_25_09_gives(tmp_path, check_script):
    folder = tmp_path / "env"
    (folder / "bin").mkdir(parents=True)
    activate_like_25_09(folder)
    server_env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/opt/triton/libs",
                  "PYTHONHOME": "/somewhere", "OTHER": "kept"}  # fmt: skip
    launch = (
        f"source {folder}/bin/activate && exec env "
        f"LD_LIBRARY_PATH={folder}/lib:$LD_LIBRARY_PATH env -0"
    )  # 2.51's, stub -> env -0
    out = subprocess.run(["bash", "-c", launch], env=server_env, capture_output=True, check=True)
    seen = dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if item)
    seen["LD_LIBRARY_PATH"] = seen["LD_LIBRARY_PATH"].split(":", 1)[1]  # the stub's own strip
    for bash_own in ("_", "SHLVL", "PWD", "OLDPWD"):
        seen.pop(bash_own, None)
    assert seen == check_script.environ_like_25_09(str(folder), server_env)
    assert seen["LD_LIBRARY_PATH"] == f"{folder}/lib:/opt/triton/libs" and "PYTHONHOME" not in seen


def test_the_check_script_starts_envs_without_activate(tmp_path, check_script):
    log = tmp_path / "unpacked.log"
    tarball = conda_like_tarball(tmp_path / "build", log)
    report = check_script.check(tarball, ("avatarforge.serving.bootstrap",), tmp_path / "work")
    assert report["problems"] == []
    assert report["prefix"] == report["env"]  # python3 on the 25.09 PATH is the env's
    assert (Path(report["env"]) / "lib" / "prefix.txt").read_text() == report["env"]
    # a conda activation hook would not run on 25.09+: the check says so
    hooks = tmp_path / "build" / "thin-env" / "etc" / "conda" / "activate.d"
    hooks.mkdir(parents=True)
    (hooks / "libxml2_activate.sh").write_text("export XML_CATALOG_FILES=...\n")
    hooked = write_reproducible_tar(hooks.parents[2], tmp_path / "hooked.tar.gz", ".",
                                    allow_symlinks=True)  # fmt: skip
    out = subprocess.run([sys.executable, str(CHECK_SCRIPT), str(hooked), "json"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 1 and "libxml2_activate.sh" in out.stdout


PROBE_CONFIG = """name: "probe"
backend: "python"
max_batch_size: 0
input [ {{ name: "X", data_type: TYPE_FP32, dims: [ 1 ] }} ]
output [ {{ name: "Y", data_type: TYPE_FP32, dims: [ 1 ] }} ]
parameters: {{ key: "EXECUTION_ENV_PATH", value: {{ string_value: "{env}" }} }}
parameters: {{ key: "REPORT", value: {{ string_value: "{report}" }} }}
"""
PROBE_MODEL = """import importlib, json, os, sys
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        modules = {{m: importlib.import_module(m).__file__ for m in {modules!r}}}
        report = {{"prefix": sys.prefix, "modules": modules, "environ": dict(os.environ)}}
        with open(params["REPORT"]["string_value"], "w") as f:
            json.dump(report, f)

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(
            r, "X").as_numpy())]) for r in requests]
"""


def start_like_25_09(folder: Path, tmp_path: Path, modules) -> tuple[dict, dict]:
    """Load a python model in ``folder`` with the real tritonserver and stub, started as 25.09
    starts it; returns what the model saw and the server's environment."""
    from avatarforge.tritonserver.launch import tritonserver

    activate_like_25_09(folder)
    model = tmp_path / "repo" / "probe"
    (model / "1").mkdir(parents=True)
    report = tmp_path / "probe.json"
    (model / "config.pbtxt").write_text(PROBE_CONFIG.format(env=folder, report=report))
    (model / "1" / "model.py").write_text(PROBE_MODEL.format(modules=tuple(modules)))
    # a PYTHONHOME the stub must not get (25.09 drops it): it would break the stub's Python
    env = {"PYTHONHOME": "/nonexistent/python-home", "AVATARFORGE_PROBE": "passed through"}
    with tritonserver([model.parent], load=["probe"], env=env,
                      log_path=tmp_path / "triton.log") as server:  # fmt: skip
        raw = Path(f"/proc/{server.process.pid}/environ").read_bytes()
    server_env = dict(item.split("=", 1) for item in raw.decode().split("\0") if item)
    return json.loads(report.read_text()), server_env


def _assert_started_like_25_09(seen: dict, server_env: dict, folder: Path, check_script) -> None:
    expected = check_script.environ_like_25_09(str(folder), server_env)
    assert seen["prefix"] == str(folder)  # the stub's Python runs from the env
    assert {k: seen["environ"].get(k) for k in _SET_BY_25_09} == {
        k: expected.get(k) for k in _SET_BY_25_09
    }
    assert seen["environ"]["AVATARFORGE_PROBE"] == "passed through"


@pytest.mark.integration
def test_an_extracted_env_starts_without_activate(tmp_path, check_script):
    """The thin env (this checkout's packages behind a venv), extracted by the bootstrap, loads
    the shared base's imports in the real stub with only what 25.09 sets."""
    tarball = thin_env_tarball(tmp_path / "build")
    folder = Path(_ensure(tmp_path / "shared", str(tarball))).resolve()
    seen, server_env = start_like_25_09(folder, tmp_path, check_script.SHARED_BASE_IMPORTS)
    _assert_started_like_25_09(seen, server_env, folder, check_script)
    assert set(seen["modules"]) == set(check_script.SHARED_BASE_IMPORTS)


@pytest.mark.integration
@pytest.mark.slow
def test_the_make_env_env_starts_without_activate(repo_root, tmp_path, check_script):
    """The env `make env` builds (build/test-cache/envs/serve, built once by test_envs.py),
    copied elsewhere (hard links) so its activate can be replaced: every shared-base import
    comes from inside it."""
    from avatarforge import envs

    built = envs.build(envs.plan(repo_root))
    folder = Path(tempfile.mkdtemp(prefix=".moved-", dir=built.parent)).resolve()
    try:
        subprocess.run(["cp", "-al", f"{built}/.", str(folder)], check=True)
        seen, server_env = start_like_25_09(folder, tmp_path, check_script.SHARED_BASE_IMPORTS)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _assert_started_like_25_09(seen, server_env, folder, check_script)
    for module, path in seen["modules"].items():
        assert path.startswith(f"{folder}/lib/python3.11/site-packages/"), module
