"""Deployment settings of the served models, and how a running model reads them back.

A setting reaches a model through its config's ``parameters`` when it belongs to the model (the
base hash an adapter was trained on, the environment Triton must start it in) and through the
server's process environment when it belongs to the instance (where the shared files live, where
the base comes from; a parameter of that name, if the deployment config sets one, wins: see
:func:`instance_setting`). Packaged user models therefore carry no machine paths by default
except EXECUTION_ENV_PATH, which Triton reads before any of our code runs.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..settings import ConfigError, Settings, setting
from . import schema

# Config parameter names; the instance-level ones double as environment variable names.
P_ENV_PATH = "EXECUTION_ENV_PATH"
P_SHARED_DIR = "AVATARFORGE_SHARED_DIR"
P_BASE_SOURCE = "AVATARFORGE_BASE_SOURCE"
P_ENV_SOURCE = "AVATARFORGE_ENV_SOURCE"
P_BASE_ID = "BASE_ID"
P_BASE_HASH = "BASE_HASH"
P_BASE_PATH = "BASE_PATH"
P_ADAPTER_DIR = "ADAPTER_DIR"
P_CACHE_SIZE = "ADAPTER_CACHE_SIZE"
P_DEVICE = "DEVICE"  # of the shared base; resolved where it runs, not where it was packaged

ADAPTER_SUBDIR = "1/adapter"  # inside a user model folder
SD_BASE_PREFIX = "sd_base_"  # + base hash: one shared process per base
ADAPTER_CACHE_SIZE = 16  # adapters kept loaded on the shared base, unless configured


@dataclass
class ServingConfig(Settings):
    section = "serving"
    env_path: str = setting(
        "",
        "EXECUTION_ENV_PATH of the models (a venv/conda folder with bin/activate or a "
        "conda-pack tar.gz); empty: $AVATARFORGE_SERVING_ENV, else this interpreter's env",
    )
    shared_dir: str = setting(
        "", "where base weights and environment are shared; empty: the server's environment"
    )
    base_source: str = setting(
        "", "base weights: diffusers folder, tarball path or s3:// URI; empty: from environment"
    )
    env_source: str = setting(
        "", "serving env for the shared base: folder, tarball or s3:// URI; empty: env_path"
    )
    # at most the shared base's batch size: a user model forwards whole requests to it
    max_batch_size: int = setting(
        schema.MAX_BATCH_SIZE, "rows per request", ge=1, le=schema.MAX_BATCH_SIZE
    )
    adapter_cache_size: int = setting(
        ADAPTER_CACHE_SIZE, "adapters kept loaded on the shared base", ge=1, le=1024
    )
    device: str = setting("auto", "instance kind", choices=("auto", "cpu", "cuda"))

    def validate(self) -> None:
        if self.env_path and "$" in self.env_path.replace("$$TRITON_MODEL_DIRECTORY", ""):
            raise ConfigError("serving.env_path: only $$TRITON_MODEL_DIRECTORY may be expanded")

    def resolved_env_path(self) -> str:
        return self.env_path or os.environ.get("AVATARFORGE_SERVING_ENV") or sys.prefix


def model_params(args: dict[str, str]) -> dict[str, str]:
    """A running model's config parameters as plain strings (Triton's string_value form)."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def instance_setting(params: dict[str, str], name: str, default: str = "") -> str:
    """A parameter if the config sets it, else the server's environment variable of that name."""
    return params.get(name) or os.environ.get(name) or default


def shared_dir(params: dict[str, str]) -> Path:
    default = str(Path.home() / ".cache" / "avatarforge" / "shared")
    return Path(instance_setting(params, P_SHARED_DIR, default)).expanduser()
