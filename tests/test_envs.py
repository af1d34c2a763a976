"""The serving environment: spec consistency, build plan, and one real (cached) build."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from avatarforge import envs


def test_environment_yml_matches_pyproject(repo_root) -> None:
    spec = yaml.safe_load((repo_root / envs.SPEC_FILE).read_text())
    deps = spec["dependencies"]
    # no Python pin: the builder gives the stub's (3.11 here, the image's own in the image)
    assert not any(isinstance(d, str) and d.startswith("python") for d in deps)
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert sorted(pip) == sorted(envs.project_requirements(repo_root / "pyproject.toml"))
    assert "numpy==1.26.4" in pip
    # only what serving needs
    for unwanted in ("dlib", "opencv", "moto", "pytest", "tritonclient", "pytriton"):
        assert not any(unwanted in p.lower() for p in pip), unwanted


def test_venv_plan_installs_torch_first_then_serve_extra(tmp_path: Path, repo_root) -> None:
    p = envs.plan(repo_root, tmp_path / "serve", conda="")
    assert (p.kind, p.state) == ("venv", "missing")
    venv, torch, serve = p.steps
    assert venv[:3] == (str(envs.SYSTEM_PYTHON), "-m", "venv")
    assert torch[-1] == "torch==2.13.0" and "[serve]" not in " ".join(torch)
    assert serve[-2:] == ("torch==2.13.0", f"{repo_root}[serve]")


def test_conda_plan_uses_environment_yml_with_the_stubs_python(tmp_path: Path, repo_root) -> None:
    p = envs.plan(repo_root, tmp_path / "serve", conda="/opt/conda/bin/conda")
    assert p.kind == "conda"
    create, update, project = p.steps
    assert create[:2] == ("/opt/conda/bin/conda", "create") and "python=3.11" in create
    assert update[:3] == ("/opt/conda/bin/conda", "env", "update")
    assert str(repo_root / envs.SPEC_FILE) in update
    assert "--no-deps" in project and project[-1] == str(repo_root)
    assert p.spec_key != envs.plan(repo_root, tmp_path / "serve", conda="").spec_key
    other = envs.plan(repo_root, tmp_path / "serve", conda="conda", python_version="3.12")
    assert "python=3.12" in other.steps[0] and other.spec_key != p.spec_key


def test_plan_is_idempotent_through_the_stamp(tmp_path: Path, repo_root) -> None:
    env_dir = tmp_path / "serve"
    p = envs.plan(repo_root, env_dir, conda="")
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "bin" / "activate").write_text('VIRTUAL_ENV="/built/here"\nexport VIRTUAL_ENV\n')
    envs.build(envs.EnvPlan(**{**p.__dict__, "steps": ()}), log=lambda _: None)  # stamp only
    again = envs.plan(repo_root, env_dir, conda="")
    assert (again.state, again.steps) == ("up-to-date", ())
    stamp = json.loads((env_dir / envs.STAMP_NAME).read_text())
    (env_dir / envs.STAMP_NAME).write_text(json.dumps({**stamp, "source": "old"}))
    changed = envs.plan(repo_root, env_dir, conda="")
    assert changed.state == "sources-changed"
    assert len(changed.steps) == 1 and "--no-deps" in changed.steps[0]
    (env_dir / envs.STAMP_NAME).write_text(json.dumps({**stamp, "spec": "old"}))
    assert envs.plan(repo_root, env_dir, conda="").state == "stale"
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
def test_build_serving_venv_and_import_diffusers(repo_root) -> None:
    """Builds build/test-cache/envs/serve once (~2-3 min), then only checks it."""
    p = envs.plan(repo_root)
    env_dir = envs.build(p)
    # (not state == "up-to-date": sources edited while this runs would make it "sources-changed")
    assert envs.read_stamp(env_dir)["spec"] == envs.plan(repo_root).spec_key
    printed = envs.check_env(env_dir)
    assert printed.startswith("3.11.") and "numpy 1.26.4" in printed
    site = next((env_dir / "lib").glob("python3.11/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"torch", "diffusers", "peft", "transformers", "accelerate", "avatarforge"} <= installed
    for unwanted in ("dlib_bin", "opencv_python_headless", "moto", "pytest", "tritonclient"):
        assert unwanted not in installed


def test_image_build_names_the_deployed_triton_tag_and_refuses_without_an_engine(repo_root):
    from avatarforge.deploy.config import DeployConfig

    dockerfile = (repo_root / "conda_envs" / "Dockerfile").read_text()
    assert f"ARG TRITON_TAG={DeployConfig().triton_image_tag}" in dockerfile
    # the env's Python is the image's own python3, never a pinned guess
    assert "python3 -c" in dockerfile and "conda-pack" in dockerfile
    # the packed env is checked as an instance uses it: the bootstrap extracts it, and it is
    # started without bin/activate, as Triton 25.09+ starts it (check_packed_env.py)
    assert "RUN python3 /tmp/check/check_packed_env.py /out/serve-env-py" in dockerfile
    assert "src/avatarforge/serving/bootstrap.py conda_envs/check_packed_env.py" in dockerfile
    script = repo_root / "conda_envs" / "build_in_image.sh"
    env = {"PATH": "/usr/bin:/bin", "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "Docker engine" in result.stderr or "docker is not installed" in result.stderr
