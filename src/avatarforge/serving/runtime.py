"""What the Triton model.py files do at load time, as plain functions (no Triton import).

Both model_setup and every user model run :func:`plan_shared_base` from ``initialize()``: it
makes the base and environment present at the shared path (the ensure-step) and returns what
``pb_utils.load_model`` needs to start the one shared base model if it is not running yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from filelock import FileLock

from ..base import BaseError, BaseInfo, check_same_base
from .config import (
    ADAPTER_CACHE_SIZE,
    ADAPTER_SUBDIR,
    P_ADAPTER_DIR,
    P_BASE_HASH,
    P_BASE_ID,
    P_BASE_SOURCE,
    P_CACHE_SIZE,
    P_DEVICE,
    P_ENV_PATH,
    P_ENV_SOURCE,
    instance_setting,
    model_params,
    shared_dir,
)
from .shared_files import ensure_base, ensure_env
from .triton_config import sd_base_config, sd_base_name, to_json

__all__ = ["SharedBasePlan", "model_params", "plan_shared_base", "user_adapter"]


@dataclass(frozen=True)
class SharedBasePlan:
    name: str  # Triton model name of the shared base (one per base hash)
    config_json: str
    files: dict[str, bytes]
    base: BaseInfo
    lock_path: Path

    def lock(self) -> FileLock:
        """Held while checking for / loading the shared base, so only one model loads it."""
        return FileLock(str(self.lock_path), timeout=600)

    def ensure_loaded(self, pb_utils) -> None:
        """Start the shared base unless it is ready (``pb_utils``: the caller's Triton module).

        The lock makes concurrent first loads start it once; a model may call this per batch so
        the shared base comes back if something unloaded it.
        """
        if pb_utils.is_model_ready(self.name):
            return
        with self.lock():
            if not pb_utils.is_model_ready(self.name):
                pb_utils.load_model(model_name=self.name, config=self.config_json, files=self.files)

    def status(self) -> str:
        config = json.loads(self.config_json)
        return json.dumps({"shared_base": self.name, **self.base.to_dict(), "config": config})


def sd_base_source() -> bytes:
    """The shared base's model.py: ships with the library, so it always matches it."""
    return resources.files(__package__).joinpath("triton_sd_base.py").read_bytes()


def plan_shared_base(params: dict[str, str]) -> SharedBasePlan:
    shared = shared_dir(params)
    base = ensure_base(
        instance_setting(params, P_BASE_SOURCE),
        shared,
        expected_hash=params.get(P_BASE_HASH, ""),
        base_id=params.get(P_BASE_ID, ""),
    )
    env = ensure_env(instance_setting(params, P_ENV_SOURCE), shared) or params.get(P_ENV_PATH, "")
    config = sd_base_config(
        base.base_id,
        base.content_hash,
        str(base.path),
        env,
        cache_size=int(params.get(P_CACHE_SIZE) or ADAPTER_CACHE_SIZE),
        device=params.get(P_DEVICE) or "auto",
    )
    name = sd_base_name(base.content_hash)
    (shared / ".locks").mkdir(parents=True, exist_ok=True)
    return SharedBasePlan(
        name, to_json(config), {"file:1/model.py": sd_base_source()}, base,
        shared / ".locks" / f"{name}.lock",
    )  # fmt: skip


def user_adapter(model_dir: str | Path, params: dict[str, str]) -> Path:
    """The user's adapter folder, checked against the base its config names (fail at load)."""
    from ..adapter import read_adapter

    folder = Path(model_dir) / params.get(P_ADAPTER_DIR, ADAPTER_SUBDIR)
    meta = read_adapter(folder)
    expected = params.get(P_BASE_HASH, "")
    if not expected:
        raise BaseError(f"{P_BASE_HASH} missing from the user model's config parameters")
    check_same_base(meta.to_dict(), BaseInfo(params.get(P_BASE_ID, ""), expected, folder))
    return folder.resolve()
