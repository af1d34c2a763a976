"""The serving environment: spec consistency, build plan, and one real (cached) build."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from avatarforge import envs


def test_environment_yml_matches_pyproject() -> None:
    spec = yaml.safe_load(envs.SPEC_FILE.read_text())
    deps = spec["dependencies"]
    assert "python=3.11" in deps  # the Triton stub's Python
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert sorted(pip) == sorted(envs.project_requirements())
    assert "numpy==1.26.4" in pip
    # only what serving needs
    for unwanted in ("dlib", "opencv", "moto", "pytest", "boto3", "tritonclient", "pytriton"):
        assert not any(unwanted in p.lower() for p in pip), unwanted


def test_venv_plan_installs_torch_first_then_serve_extra(tmp_path: Path) -> None:
    p = envs.plan(tmp_path / "serve", conda="")
    assert (p.kind, p.state) == ("venv", "missing")
    venv, torch, serve = p.steps
    assert venv[:3] == (str(envs.SYSTEM_PYTHON), "-m", "venv")
    assert torch[-1] == "torch==2.13.0" and "[serve]" not in " ".join(torch)
    assert serve[-2:] == ("torch==2.13.0", f"{envs.REPO}[serve]")


def test_conda_plan_uses_environment_yml(tmp_path: Path) -> None:
    p = envs.plan(tmp_path / "serve", conda="/opt/conda/bin/conda")
    assert p.kind == "conda"
    create, project = p.steps
    assert create[:3] == ("/opt/conda/bin/conda", "env", "create")
    assert str(envs.SPEC_FILE) in create
    assert "--no-deps" in project and project[-1] == str(envs.REPO)
    assert p.spec_key != envs.plan(tmp_path / "serve", conda="").spec_key


def test_plan_is_idempotent_through_the_stamp(tmp_path: Path) -> None:
    env_dir = tmp_path / "serve"
    p = envs.plan(env_dir, conda="")
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "bin" / "activate").write_text('VIRTUAL_ENV="/built/here"\nexport VIRTUAL_ENV\n')
    envs.build(envs.EnvPlan(**{**p.__dict__, "steps": ()}), log=lambda _: None)  # stamp only
    again = envs.plan(env_dir, conda="")
    assert (again.state, again.steps) == ("up-to-date", ())
    stamp = json.loads((env_dir / envs.STAMP_NAME).read_text())
    (env_dir / envs.STAMP_NAME).write_text(json.dumps({**stamp, "source": "old"}))
    changed = envs.plan(env_dir, conda="")
    assert changed.state == "sources-changed"
    assert len(changed.steps) == 1 and "--no-deps" in changed.steps[0]
    (env_dir / envs.STAMP_NAME).write_text(json.dumps({**stamp, "spec": "old"}))
    assert envs.plan(env_dir, conda="").state == "stale"
    # activate no longer names the folder it was built in
    assert "/built/here" not in (env_dir / "bin" / "activate").read_text()


def test_relocatable_activate_finds_its_own_folder(tmp_path: Path) -> None:
    env_dir = tmp_path / "built"
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "bin" / "activate").write_text('VIRTUAL_ENV="/somewhere/else"\nexport VIRTUAL_ENV\n')
    envs.make_activate_relocatable(env_dir)
    moved = tmp_path / "moved"
    env_dir.rename(moved)
    command = f"source {moved}/bin/activate && echo $VIRTUAL_ENV"
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(moved)


def test_pack_plain_tar_keeps_symlinks_at_top_level(tmp_path: Path) -> None:
    env_dir = tmp_path / "serve"
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "bin" / "activate").write_text("# activate\n")
    (env_dir / "bin" / "python").symlink_to("/usr/bin/python3.11")
    out = envs.pack(env_dir, tmp_path / "serve.tar.gz")
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/python"].issym()
    assert members["bin/python"].linkname == "/usr/bin/python3.11"
    assert "bin/activate" in members
    assert envs.pack(env_dir, tmp_path / "again.tar.gz").read_bytes() == out.read_bytes()


@pytest.mark.slow
def test_build_serving_venv_and_import_diffusers() -> None:
    """Builds build/test-cache/envs/serve once (~2-3 min), then only checks it."""
    p = envs.plan()
    env_dir = envs.build(p)
    # (not state == "up-to-date": sources edited while this runs would make it "sources-changed")
    assert envs.read_stamp(env_dir)["spec"] == envs.plan().spec_key
    printed = envs.check_env(env_dir)
    assert printed.startswith("3.11.") and "numpy 1.26.4" in printed
    site = next((env_dir / "lib").glob("python3.11/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"torch", "diffusers", "peft", "transformers", "accelerate", "avatarforge"} <= installed
    for unwanted in ("dlib_bin", "opencv_python_headless", "moto", "pytest", "boto3"):
        assert unwanted not in installed
