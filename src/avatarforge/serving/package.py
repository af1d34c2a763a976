"""`avatarforge package`: one user's Triton model as the tarball SageMaker MME loads.

``<user>.tar.gz`` holds the folder ``<user>/`` (SageMaker untars into ``.../model`` and Triton
finds the model folder there): ``config.pbtxt`` rendered from the schema, ``1/model.py`` from
``model_repository/user_template``, ``1/adapter/`` with the LoRA weights and metadata. It is
checked before it is written and its bytes are reproducible.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from ..adapter import METADATA_FILE, WEIGHTS_FILE, read_adapter
from ..base import BaseInfo, check_same_base
from ..paths import build_dir
from ..safe_tar import write_reproducible_tar
from . import schema
from .config import ADAPTER_SUBDIR, SD_BASE_PREFIX, ServingConfig
from .triton_config import SETUP_MODEL, parse_pbtxt, to_pbtxt, user_model_config

USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")  # a Triton model name and S3 key


class PackageError(ValueError):
    """The user model cannot be packaged as asked; the message says why."""


def model_repository() -> Path:
    """The checked-in model_repository/ (or $AVATARFORGE_MODEL_REPOSITORY)."""
    default = Path(__file__).resolve().parents[3] / "model_repository"
    return Path(os.environ.get("AVATARFORGE_MODEL_REPOSITORY", default))


def check_user_name(user: str) -> str:
    if not USER_NAME.match(user) or user == SETUP_MODEL or user.startswith(SD_BASE_PREFIX):
        raise PackageError(
            f"user {user!r}: use 1-63 letters, digits, '_' or '-' (not {SETUP_MODEL!r} or "
            f"{SD_BASE_PREFIX}*): it becomes a Triton model name and an S3 key"
        )
    return user


def _check_config(text: str, user: str) -> None:
    config = parse_pbtxt(text)
    names = [i["name"] for i in config.get("input", [])]
    if config.get("name") != user or names != [s.name for s in schema.INPUTS]:
        raise PackageError(f"rendered config does not match the schema: {config}")


def package_user(
    user: str,
    adapter_dir: Path,
    out_dir: Path | None = None,
    *,
    base: BaseInfo,
    device: str = "auto",
    serving: ServingConfig | None = None,
) -> Path:
    """Write ``out_dir/<user>.tar.gz`` (default build/package/) and return its path."""
    check_user_name(user)
    meta = read_adapter(adapter_dir)
    check_same_base(meta.to_dict(), base)  # an adapter only works on its own base
    serving = serving or ServingConfig(device=device)
    text = to_pbtxt(user_model_config(user, base.base_id, base.content_hash, serving))
    _check_config(text, user)
    template = model_repository() / "user_template" / "1" / "model.py"
    out_dir = Path(out_dir or build_dir() / "package")
    with tempfile.TemporaryDirectory(prefix=f".{user}-", dir=_mkdir(out_dir)) as tmp:
        model = Path(tmp) / user
        (model / ADAPTER_SUBDIR).mkdir(parents=True)
        (model / "config.pbtxt").write_text(text)
        shutil.copyfile(template, model / "1" / "model.py")
        for name in (WEIGHTS_FILE, METADATA_FILE):  # only what serving reads
            shutil.copyfile(Path(adapter_dir) / name, model / ADAPTER_SUBDIR / name)
        return write_reproducible_tar(model, out_dir / f"{user}.tar.gz", arcname=user)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
