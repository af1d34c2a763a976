"""The serving environment: what the shared base runs in (its EXECUTION_ENV_PATH), and the
bare Python that user models run under.

The spec is ``conda_envs/environment.yml`` of a checkout (numpy < 2, the ``serve`` extra of
pyproject.toml); the Python is given by the builder and must be the Triton stub's (3.11 for
the local tritonserver; 3.12 in the SageMaker Triton images 24.11+: build that one inside the
image with ``conda_envs/build_in_image.sh``). Where ``conda`` exists the environment is built
with it and packed with conda-pack. Elsewhere it is a venv made from the system
``/usr/bin/python3.11``
— the 3.11 stub links the system ``libpython3.11.so.1.0``, so such a venv works as
EXECUTION_ENV_PATH as is — with ``torch==2.13.0`` installed first (any other torch request pulls
a multi-GB CUDA build) and then ``.[serve]``: no dlib, OpenCV, moto or pytest.

Idempotent: a stamp in the environment records a hash of the spec (environment.yml, the
project's dependencies, the base interpreter); the same spec is not rebuilt, and a change in
avatarforge's own sources only reinstalls avatarforge (seconds).

Relocating a venv (what a plain tarball of it needs, unlike a conda-pack one):

- ``bin/activate`` hardcodes the venv's path; :func:`build` rewrites it to find its own folder,
  so Triton up to 25.07, which sources it, gets the right ``PATH`` wherever the env is. From
  25.08 Triton sources nothing and sets ``VIRTUAL_ENV``, ``PATH`` and ``LD_LIBRARY_PATH``
  itself; the env needs nothing more: the stub's Python finds its prefix through the
  ``python3`` first on ``PATH`` (tests/test_serving_env.py starts it both ways);
- ``bin/python*`` are symlinks to ``/usr/bin/python3.11`` and ``pyvenv.cfg`` says
  ``home = /usr/bin``: the target machine needs that same system Python 3.11 (and
  ``libpython3.11.so.1.0``, which the stub links anyway);
- console scripts in ``bin/`` keep absolute ``#!`` lines (Triton never runs them);
- the tarball keeps those symlinks, so it is unpacked by the bootstrap (once per instance:
  links allowed, nothing written through one) or ``tar``, not by
  :func:`avatarforge.safe_tar.safe_extract`, which refuses links.

``venv-pack`` (PyPI), when installed, is used to pack instead; it solves the same issues.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .paths import build_dir
from .safe_tar import write_reproducible_tar

_log = logging.getLogger(__name__)

SPEC_FILE = Path("conda_envs") / "environment.yml"  # in a checkout: the builder's input
STAMP_NAME = ".avatarforge-env.json"
SYSTEM_PYTHON = Path("/usr/bin/python3.11")
TORCH = "torch==2.13.0"  # first, alone: the local CPU build (see pyproject.toml)
_PIP = ("-m", "pip", "install", "--disable-pip-version-check", "--quiet")
_ACTIVATE_LINE = re.compile(r'^VIRTUAL_ENV=["\']?[^"\'\n]*["\']?$', re.MULTILINE)
_RELOCATABLE = 'VIRTUAL_ENV="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"'


@dataclass(frozen=True)
class EnvPlan:
    """What :func:`build` will do; plain data, printed by ``make env --plan``."""

    kind: str  # "conda" or "venv"
    env_dir: Path
    spec_key: str  # hash of everything that decides the installed packages
    source_key: str  # hash of avatarforge's own sources (reinstalled alone when it changes)
    requirements: tuple[str, ...]  # third-party packages, as pinned in pyproject.toml
    steps: tuple[tuple[str, ...], ...] = field(default=())  # commands, in order
    state: str = "missing"  # "missing" | "stale" | "sources-changed" | "up-to-date"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["env_dir"] = str(self.env_dir)
        return data


def default_env_dir() -> Path:
    return build_dir() / "envs" / "serve"


def project_requirements(pyproject: Path) -> tuple[str, ...]:
    """avatarforge's own dependencies plus its ``serve`` extra: what serving imports."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return tuple(project["dependencies"]) + tuple(project["optional-dependencies"]["serve"])


def spec_key(spec_file: Path, pyproject: Path, base: str) -> str:
    digest = hashlib.sha256()
    for part in (spec_file.read_bytes(), json.dumps(project_requirements(pyproject)).encode()):
        digest.update(part)
    digest.update(base.encode())
    return digest.hexdigest()[:16]


def source_key(project: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted((project / "src" / "avatarforge").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(path.relative_to(project).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def read_stamp(env_dir: Path) -> dict:
    try:
        return json.loads((env_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return {}


def plan(
    project: Path,
    env_dir: Path | None = None,
    *,
    conda: str | None = None,
    base_python: Path = SYSTEM_PYTHON,
    python_version: str = f"{sys.version_info.major}.{sys.version_info.minor}",
) -> EnvPlan:
    """Decide how to build the environment of the checkout ``project`` and whether anything
    needs doing.

    ``conda``: the conda executable (default: found on PATH), creating ``python_version`` (the
    stub's); without it, a venv from ``base_python``.
    """
    project = Path(project).resolve()
    spec_file = project / SPEC_FILE
    env_dir = Path(env_dir or default_env_dir()).resolve()
    conda = conda if conda is not None else shutil.which("conda")
    kind = "conda" if conda else "venv"
    base = f"conda:{conda}:python={python_version}" if conda else f"venv:{base_python}"
    key = spec_key(spec_file, project / "pyproject.toml", base)
    src_key = source_key(project)
    py = str(env_dir / "bin" / "python")
    project_only = (py, *_PIP, "--no-deps", "--force-reinstall", str(project))
    if kind == "conda":
        full = (
            (conda, "create", "--yes", "--prefix", str(env_dir), f"python={python_version}", "pip"),
            (conda, "env", "update", "--prefix", str(env_dir), "--file", str(spec_file)),
            project_only,
        )
    else:
        full = (
            (str(base_python), "-m", "venv", "--clear", str(env_dir)),
            (py, *_PIP, TORCH),
            (py, *_PIP, TORCH, f"{project}[serve]"),
        )
    stamp = read_stamp(env_dir)
    if stamp.get("spec") != key:
        state, steps = ("stale" if stamp else "missing"), full
    elif stamp.get("source") != src_key:
        state, steps = "sources-changed", (project_only,)
    else:
        state, steps = "up-to-date", ()
    requirements = project_requirements(project / "pyproject.toml")
    return EnvPlan(kind, env_dir, key, src_key, requirements, steps, state)


def build(env_plan: EnvPlan, *, log=None) -> Path:
    """Run the plan's steps; write the stamp last, so an interrupted build is redone.
    ``log`` gets each command before it runs (default: this module's logger)."""
    log = log or _log.info
    env_dir = env_plan.env_dir
    if env_plan.state in ("missing", "stale"):
        (env_dir / STAMP_NAME).unlink(missing_ok=True)
    env = dict(os.environ, PIP_NO_INPUT="1")
    env.pop("VIRTUAL_ENV", None)  # never install into the venv that runs this
    for step in env_plan.steps:
        log("+ " + " ".join(step))
        subprocess.run(step, check=True, env=env)
    if env_plan.kind == "venv":
        make_activate_relocatable(env_dir)
    stamp = {"spec": env_plan.spec_key, "source": env_plan.source_key, "kind": env_plan.kind}
    (env_dir / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
    return env_dir


def make_activate_relocatable(env_dir: Path) -> None:
    """Let ``bin/activate`` find its own folder instead of the path it was built at."""
    activate = env_dir / "bin" / "activate"
    text = activate.read_text()
    fixed = _ACTIVATE_LINE.sub(lambda _: _RELOCATABLE, text, count=1)
    if fixed != text:
        activate.write_text(fixed)


def pack(env_dir: Path, out_path: Path, *, kind: str = "venv") -> Path:
    """The environment as a tar.gz for EXECUTION_ENV_PATH (conda-pack / venv-pack / plain)."""
    env_dir, out_path = Path(env_dir), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "conda":
        cmd = ["conda-pack", "--prefix", str(env_dir), "--output", str(out_path), "--force"]
        subprocess.run(cmd, check=True)
        return out_path
    try:
        import venv_pack  # type: ignore[import-not-found]
    except ImportError:
        # level 6: a GB of wheels packs ~3x faster than at 9 for a few % more bytes
        return write_reproducible_tar(env_dir, out_path, ".", allow_symlinks=True, compresslevel=6)
    venv_pack.pack(prefix=str(env_dir), output=str(out_path), force=True)
    return out_path


def bare_env(env_dir: Path | None = None, *, base_python: Path = SYSTEM_PYTHON) -> Path:
    """A Python like the stock Triton image's default one: the interpreter and numpy, nothing
    else (no avatarforge, no torch, no boto3). Local servers put its ``bin`` first on
    tritonserver's PATH: the python backend stub of a model without EXECUTION_ENV_PATH finds
    ``python3`` there and takes its ``sys.prefix``, so user models start as they would on the
    SageMaker image. numpy is linked in from this environment (same version, no download).
    Idempotent and safe when several starters race (built aside, renamed into place).
    """
    import importlib.metadata

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env_dir = Path(env_dir or build_dir() / "envs" / f"bare-py{version}").resolve()
    site = env_dir / "lib" / f"python{version}" / "site-packages"
    if (site / "numpy").exists():
        return env_dir
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{env_dir.name}-", dir=env_dir.parent))
    try:
        subprocess.run([str(base_python), "-m", "venv", "--without-pip", str(tmp)], check=True)
        dist = importlib.metadata.distribution("numpy")
        installed = Path(dist.locate_file(""))  # the site-packages numpy lives in
        tmp_site = tmp / "lib" / f"python{version}" / "site-packages"
        for name in ("numpy", "numpy.libs", f"numpy-{dist.version}.dist-info"):
            if (installed / name).exists():
                (tmp_site / name).symlink_to(installed / name)
        make_activate_relocatable(tmp)
        if env_dir.exists() and not (site / "numpy").exists():
            shutil.rmtree(env_dir)  # left half-made by a crash
        try:
            os.rename(tmp, env_dir)
        except OSError:
            if not (site / "numpy").exists():  # else a peer finished first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return env_dir


def check_env(env_dir: Path, modules: tuple[str, ...] = ("diffusers", "avatarforge")) -> str:
    """Import ``modules`` with the environment's Python; returns what it printed."""
    code = "import sys, numpy; " + "; ".join(f"import {m}" for m in modules)
    code += "; print(sys.version.split()[0], 'numpy', numpy.__version__)"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    python = str(Path(env_dir) / "bin" / "python")
    result = subprocess.run(
        [python, "-c", code], check=True, capture_output=True, text=True, env=env, cwd="/"
    )
    return result.stdout.strip()
