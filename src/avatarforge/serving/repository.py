"""The repository a local tritonserver serves: model_setup rendered for this machine plus the
packaged users, unpacked the way SageMaker unpacks them (safely)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from ..safe_tar import safe_extract
from .config import ServingConfig
from .package import model_repository
from .triton_config import SETUP_MODEL, setup_model_config, to_pbtxt


def build_repository(
    out: Path, packages: Sequence[Path] = (), serving: ServingConfig | None = None
) -> list[str]:
    """(Re)make ``out`` and return the user model names it holds."""
    if out.exists():
        shutil.rmtree(out)
    setup = out / SETUP_MODEL
    (setup / "1").mkdir(parents=True)
    (setup / "config.pbtxt").write_text(to_pbtxt(setup_model_config(serving)))
    shutil.copyfile(model_repository() / SETUP_MODEL / "1" / "model.py", setup / "1" / "model.py")
    users = []
    for package in packages:
        unpacked = out / f".{Path(package).name}.unpacked"
        safe_extract(Path(package), unpacked)
        (model,) = [p for p in unpacked.iterdir() if p.is_dir()]
        shutil.move(model, out / model.name)
        shutil.rmtree(unpacked)
        users.append(model.name)
    return users
