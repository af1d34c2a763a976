"""The repository a local tritonserver serves: model_setup rendered for this machine plus the
packaged users, unpacked the way SageMaker unpacks them (safely)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from ..names import SETUP_MODEL
from . import triton_models
from .config import ServingConfig
from .package import unpack_package
from .triton_config import setup_model_config, to_pbtxt


def build_repository(
    out: Path,
    packages: Sequence[Path] = (),
    serving: ServingConfig | None = None,
    *,
    env_path: str | None = None,
) -> list[str]:
    """(Re)make ``out`` and return the user model names it holds; model_setup runs in
    ``env_path`` (a serving environment: it needs the full library; default: this one)."""
    if out.exists():
        shutil.rmtree(out)
    setup = out / SETUP_MODEL
    (setup / "1").mkdir(parents=True)
    (setup / "config.pbtxt").write_text(
        to_pbtxt(setup_model_config(serving, env_path=env_path or sys.prefix))
    )
    (setup / "1" / "model.py").write_bytes(triton_models.source("model_setup.py"))
    users = []
    for package in packages:
        unpacked = out / f".{Path(package).name}.unpacked"
        model = unpack_package(Path(package), unpacked)
        shutil.move(model, out / model.name)
        shutil.rmtree(unpacked)
        users.append(model.name)
    return users
