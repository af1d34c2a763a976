"""The local files deploy uploads to ``shared/``: the base weights tarball and the serving env.

Both are named in S3 by their sha256 (``shared/base-<sha256>.tar.gz``,
``shared/env-py3.12-<sha256>.tar.gz``), so an upload is skipped when the same bytes are there and
a new base or env never overwrites the one a running instance is reading.

The serving env is checked before anything is uploaded: its Python (read from the tarball's
``conda-meta/python-3.X*``, ``pyvenv.cfg`` or ``lib/python3.X/``) must be the one the Triton
image's python backend stub embeds, and it must have ``bin/activate`` (Triton sources it).
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..base.config import BaseConfig, resolve_base
from ..base.identity import BaseError, BaseInfo
from ..errors import AvatarforgeError
from ..hashing import sha256_file
from ..paths import build_dir
from ..safe_tar import MAX_MEMBER_BYTES, MAX_TOTAL_BYTES, write_reproducible_tar
from ..settings import ConfigError
from .config import DeployConfig
from .images import triton_python

BASE_ARCNAME = "base"  # the tarball holds one diffusers folder (what ensure_base looks for)


class AssetError(AvatarforgeError, RuntimeError):
    """A local asset cannot be made or is not fit to deploy; the message says what to do."""


@dataclass(frozen=True)
class Asset:
    """One file to upload under ``shared/``."""

    role: str  # "base" or "env"
    path: Path
    sha256: str
    size: int
    name: str  # object name under shared/
    python: str = ""  # env: the Python it was built for
    base_id: str = ""  # base: id and content hash of the weights inside
    base_hash: str = ""

    def to_dict(self) -> dict:
        return asdict(self) | {"path": str(self.path)}


@dataclass(frozen=True)
class MMEAssets:
    """What ``deploy mme`` uploads; ``env`` is None (with ``env_problem``) when none is usable."""

    base: Asset
    env: Asset | None
    env_problem: str = ""
    safety: Asset | None = None  # deploy.safety_checker's tarball; None: no check


def default_env_tarball() -> Path:
    """Where ``make env PACK=1`` writes the serving env tarball."""
    return build_dir() / "envs" / "serve.tar.gz"


# ---------------------------------------------------------------- base weights


def _check_base_sizes(info: BaseInfo) -> None:
    # The instance unpacks the tarball with safe_extract, whose limits would refuse it there,
    # on the first request; refuse here instead, where the fix is easy.
    files = [p for p in info.path.rglob("*") if p.is_file()]
    links = [p for p in info.path.rglob("*") if p.is_symlink()]
    if links:
        raise AssetError(
            f"base folder {info.path} holds symlinks ({links[0].name}, e.g. a hub cache "
            "snapshot); copy it with `cp -rL` and give the copy as deploy.base"
        )
    biggest = max(files, key=lambda p: p.stat().st_size)
    if biggest.stat().st_size > MAX_MEMBER_BYTES:
        raise AssetError(
            f"base file {biggest} is {biggest.stat().st_size / 2**30:.1f} GiB; instances unpack "
            f"at most {MAX_MEMBER_BYTES / 2**30:.0f} GiB per file: use the fp16 weights "
            "(variant='fp16', about half the size)"
        )
    total = sum(p.stat().st_size for p in files)
    if total > MAX_TOTAL_BYTES:
        raise AssetError(
            f"base folder {info.path} is {total / 2**30:.1f} GiB; instances unpack at most "
            f"{MAX_TOTAL_BYTES / 2**30:.0f} GiB"
        )


def base_asset(base: str) -> Asset:
    """The base as a reproducible tarball (built once per content hash under build/deploy/)."""
    try:
        info = resolve_base(BaseConfig(base=base))
    except (BaseError, ConfigError) as exc:
        raise AssetError(f"deploy.base: {exc}") from exc
    _check_base_sizes(info)
    cache = build_dir() / "deploy"
    tarball = cache / f"base-{info.content_hash[:16]}.tar.gz"
    sha_file = tarball.with_name(tarball.name + ".sha256")
    if not (tarball.is_file() and sha_file.is_file()):
        # level 1: safetensors weights barely compress; a multi-GB base packs ~5x faster
        write_reproducible_tar(info.path, tarball, BASE_ARCNAME, compresslevel=1)
        sha_file.write_text(sha256_file(tarball) + "\n")
    sha = sha_file.read_text().strip()
    return Asset(
        role="base",
        path=tarball,
        sha256=sha,
        size=tarball.stat().st_size,
        name=f"base-{sha}.tar.gz",
        base_id=info.base_id,
        base_hash=info.content_hash,
    )


# ---------------------------------------------------------------- serving environment

_CONDA_PYTHON = re.compile(r"^(?:[^/]+/)?conda-meta/python-(3\.\d+)\.\d+[^/]*\.json$")
_LIB_PYTHON = re.compile(r"^(?:[^/]+/)?lib/python(3\.\d+)(?:/|$)")
_PYVENV = re.compile(r"^(?:[^/]+/)?pyvenv\.cfg$")
_ACTIVATE = re.compile(r"^(?:[^/]+/)?bin/activate$")
_PYVENV_VERSION = re.compile(r"^\s*version(?:_info)?\s*=\s*(3\.\d+)", re.MULTILINE)


@dataclass(frozen=True)
class EnvFacts:
    """What an env tarball says about itself."""

    python: str  # "3.12", or "" when nothing in it names a Python
    has_activate: bool
    evidence: str  # the member that named the Python


def inspect_env_tarball(path: Path) -> EnvFacts:
    """Read the env tarball's members (streamed; stops once both facts are known)."""
    python, evidence, activate = "", "", False
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if _ACTIVATE.match(name):
                    activate = True
                if not python:
                    if (m := _CONDA_PYTHON.match(name) or _LIB_PYTHON.match(name)) is not None:
                        python, evidence = m[1], name
                    elif _PYVENV.match(name) and member.isfile():
                        text = tar.extractfile(member).read(4096).decode(errors="replace")
                        if (m := _PYVENV_VERSION.search(text)) is not None:
                            python, evidence = m[1], name
                if python and activate:
                    break
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise AssetError(f"serving env {path}: not a readable tar archive ({exc})") from exc
    return EnvFacts(python, activate, evidence)


def _how_to_build(tag: str, python: str) -> str:
    return (
        f"build one for Python {python} inside the Triton image: "
        f"`conda_envs/build_in_image.sh {tag}` (docker), or `make env PACK=1` on a machine "
        f"whose environment is Python {python}; then pass it with --env-tarball"
    )


def _cached_facts(path: Path) -> dict:
    """sha256 + EnvFacts of a tarball, remembered by (path, size, mtime): a multi-GB env is
    hashed and scanned once, not on every plan."""
    st = path.stat()
    cache_file = build_dir() / "deploy" / "env-facts.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        facts = inspect_env_tarball(path)
        cache = {key: asdict(facts) | {"sha256": sha256_file(path), "size": st.st_size}}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache, indent=2) + "\n")
    return cache[key]


def env_asset(path: Path, triton_tag: str) -> Asset:
    """The serving env tarball, refused unless it fits the Triton image's stub."""
    path = Path(path).expanduser()
    needed = triton_python(triton_tag)
    if not path.is_file():
        raise AssetError(
            f"serving env tarball {path} does not exist; {_how_to_build(triton_tag, needed)}"
        )
    facts = _cached_facts(path)
    if not facts["python"]:
        raise AssetError(
            f"serving env {path}: no Python found in it (no conda-meta/python-*, pyvenv.cfg or "
            f"lib/python3.X/); {_how_to_build(triton_tag, needed)}"
        )
    if facts["python"] != needed:
        raise AssetError(
            f"serving env {path} was built for Python {facts['python']} ({facts['evidence']}), "
            f"but the Triton image {triton_tag} runs its python backend stub with Python "
            f"{needed}, and the env's Python must match the stub's; "
            f"{_how_to_build(triton_tag, needed)}"
        )
    if not facts["has_activate"]:
        raise AssetError(
            f"serving env {path} has no bin/activate (Triton sources it to enter the env); "
            f"{_how_to_build(triton_tag, needed)}"
        )
    return Asset(
        role="env",
        path=path,
        sha256=facts["sha256"],
        size=facts["size"],
        name=f"env-py{needed}-{facts['sha256']}.tar.gz",
        python=needed,
    )


def prepare_mme_assets(config: DeployConfig) -> MMEAssets:
    """Build/inspect what ``deploy mme`` uploads (local work only: no AWS)."""
    base = base_asset(config.base)
    safety = safety_asset(config.safety_checker) if config.safety_checker else None
    env_path = Path(config.env_tarball) if config.env_tarball else default_env_tarball()
    try:
        env, problem = env_asset(env_path, config.triton_image_tag), ""
    except AssetError as exc:
        env, problem = None, str(exc)
    return MMEAssets(base=base, env=env, env_problem=problem, safety=safety)


def safety_asset(folder: str) -> Asset:
    """deploy.safety_checker as a reproducible tarball under build/deploy/, checked first."""
    from ..serving.safety import checker_folders

    path = Path(folder).expanduser()
    try:
        checker_folders(path)
    except ConfigError as exc:
        raise AssetError(f"deploy.safety_checker: {exc}") from exc
    tarball = build_dir() / "deploy" / "safety-checker.tar.gz"
    tarball.parent.mkdir(parents=True, exist_ok=True)
    write_reproducible_tar(path, tarball, "safety-checker")
    sha = sha256_file(tarball)
    return Asset("safety", tarball, sha, tarball.stat().st_size, f"safety-{sha}.tar.gz")
