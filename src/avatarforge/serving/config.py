"""Settings of the served models, and where each one comes from.

Two kinds of settings, kept apart on purpose:

- **per model**, packaged with it (:class:`ServingConfig`, rendered into config.pbtxt and the
  shared base's config by :mod:`.triton_config`): rows per request, the shared base's adapter
  caches (LoRA slots, host memory in MiB), cross-user batching, the shared base's device. Plus
  what identifies the model: the base id and hash its adapter was trained on. No machine
  paths: a package runs on any instance.
- **per instance**, from the server's process environment only (see
  :mod:`avatarforge.serving.bootstrap`: AVATARFORGE_SHARED_DIR, AVATARFORGE_BASE_SOURCE,
  AVATARFORGE_ENV_SOURCE, ...): where the shared files live and where they come from. A tarball
  in the MME prefix cannot redirect them. :func:`local_instance_env` makes that environment for
  the servers we start on this machine.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from ..names import SHARED_BASE_PREFIX
from ..settings import ConfigError, Settings, setting
from . import bootstrap, schema

# Config parameter names.
P_ENV_PATH = "EXECUTION_ENV_PATH"  # Triton's own: the Python environment of a model
P_BASE_ID = "BASE_ID"
P_BASE_HASH = "BASE_HASH"
# ServingConfig's fields travel as parameters named by the field, upper case (to_params).

SD_BASE_PREFIX = SHARED_BASE_PREFIX  # + base hash: one shared process per base
MAX_REQUEST_COST = 600  # see ServingConfig.max_request_cost
REQUEST_TIMEOUT_S = 60  # see ServingConfig.request_timeout_s
ADAPTER_CACHE_SIZE = 16  # adapters loaded the old way (the slots' fallback), unless configured
# 1024 default-rank SD 2.1 adapters (6.11 MiB each in fp16) page-locked for a GPU, where torch
# rounds each pinned block up to a power of two (8 MiB); 1340 of them on a CPU
ADAPTER_CACHE_MIB = 8192
BATCH_MAX_IMAGES = 8  # images per batched pipeline call, and LoRA slots on the shared base


@dataclass
class ServingConfig(Settings):
    section = "serving"
    # at most the shared base's batch size: a user model forwards whole requests to it
    max_batch_size: int = setting(
        schema.MAX_BATCH_SIZE, "rows per request", ge=1, le=schema.MAX_BATCH_SIZE
    )
    max_request_cost: int = setting(
        MAX_REQUEST_COST,
        "most work one request may ask for, in 512x512 denoising steps (rows x num_images x "
        "steps x height x width / 512^2); the default is about 60 s on an A10G (estimated: the "
        "H200 takes 0.025 s a step, an A10G about 4x that), SageMaker's invocation limit",
        ge=1,
        le=1_000_000,
    )
    request_timeout_s: int = setting(
        REQUEST_TIMEOUT_S,
        "seconds from a request's arrival at its user model after which its client no longer "
        "waits (SageMaker's invocation limit is 60 s): work not started by then is skipped and "
        "work under way stops between two denoising steps, answered 503 (retry); raise it "
        "where clients wait longer (a CPU serving full-size SD)",
        ge=1,
        le=86400,
    )
    adapter_cache_size: int = setting(
        ADAPTER_CACHE_SIZE,
        "adapters kept loaded on the shared base as their own LoRA layers: those the LoRA "
        "slots cannot reproduce (other layers, DoRA, per-layer ranks)",
        ge=1,
        le=1024,
    )
    adapter_cache_mib: int = setting(
        ADAPTER_CACHE_MIB,
        "host memory (MiB) for adapters ready to copy into a LoRA slot, least recently used "
        "out first: 8192 holds 1024 default-rank SD 2.1 adapters pinned for a GPU (8 MiB "
        "each), 1340 on a CPU; 0: read from disk whenever an adapter is not in a slot",
        ge=0,
        le=1048576,
    )
    batching: bool = setting(
        True,
        "run queued requests of different users with the same size, steps, scheduler, "
        "guidance and num_images as one UNet batch, a LoRA per row (equal to separate runs "
        "up to float rounding); off: one row at a time",
    )
    batch_max_images: int = setting(
        BATCH_MAX_IMAGES,
        "most images in one batched pipeline call; also the LoRA slots of the shared base "
        "(adapters resident at once, each the size of one adapter in GPU memory)",
        ge=1,
        le=64,
    )
    device: str = setting(
        "auto",
        "the shared base's device: auto (Triton places it on a GPU where there is one), cpu, cuda",
        choices=("auto", "cpu", "cuda"),
    )
    torch_compile: str = setting(
        "auto",
        "compile the shared base's UNet (torch.compile, q/k/v projections fused; CUDA graphs "
        "and channels_last on a GPU) when it starts, with inductor's cache in the shared dir so "
        "a restart finds the kernels: "
        "auto (on CUDA; off on a CPU, where compiling takes minutes and saves little), on, off",
        choices=("auto", "on", "off"),
    )

    def validate(self) -> None:
        if not isinstance(self.batching, bool):
            raise ConfigError(f"serving.batching: must be true or false (got {self.batching!r})")

    def to_params(self) -> dict[str, str]:
        """Every field as a config parameter (``ADAPTER_CACHE_MIB``: "8192", ``BATCHING``:
        "true"): how the settings reach the shared base and model_setup."""
        return {
            f.name.upper(): str(v).lower()
            if isinstance(v := getattr(self, f.name), bool)
            else str(v)
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_params(cls, params: dict[str, str]) -> ServingConfig:
        """The settings a model's config parameters carry (what :meth:`to_params` wrote; other
        parameters are ignored, missing ones take the defaults); bounds checked as always."""
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            text = params.get(f.name.upper())
            if text is None or not text.strip():
                continue
            if isinstance(f.default, bool):
                values[f.name] = flag(text, f.default)
            elif isinstance(f.default, int):
                try:
                    values[f.name] = int(text)
                except ValueError:
                    raise ConfigError(f"serving.{f.name}: not an integer ({text!r})") from None
            else:
                values[f.name] = text
        return cls(**values)


def flag(text: str | None, default: bool) -> bool:
    """A boolean config parameter (Triton's string_value): true/false, 1/0, yes/no, on/off."""
    if text is None or not text.strip():
        return default
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"config parameter: {text!r} is not true or false")


@dataclass(frozen=True)
class ModelParams:
    """Every parameter of a config we render, typed: the one place they are written
    (:meth:`to_params`, which :mod:`.triton_config` renders into config.pbtxt and the shared
    base's config) and read back (:meth:`from_params`: a running model, the package check).
    A user model reads its BASE_HASH itself (:func:`.bootstrap.model_params`: it runs under the
    image's bare Python, without avatarforge)."""

    base_id: str = ""
    base_hash: str = ""
    env_path: str = ""  # EXECUTION_ENV_PATH: the instance's serving environment, never packaged
    # the shared base's and model_setup's settings; None for a user model (its own travel in
    # the shared base's config packaged beside it)
    serving: ServingConfig | None = None

    def to_params(self) -> dict[str, str]:
        """Parameter name -> text; empty values are left out (Triton's configs omit them)."""
        params = {P_ENV_PATH: self.env_path, P_BASE_ID: self.base_id, P_BASE_HASH: self.base_hash}
        if self.serving is not None:
            params |= self.serving.to_params()
        return {k: v for k, v in params.items() if v != ""}

    @classmethod
    def from_params(cls, params: dict[str, str], *, serving: bool = True) -> ModelParams:
        """What :meth:`to_params` wrote (``serving``: read the settings too, bounds checked)."""
        return cls(
            params.get(P_BASE_ID, ""),
            params.get(P_BASE_HASH, ""),
            params.get(P_ENV_PATH, ""),
            ServingConfig.from_params(params) if serving else None,
        )

    @classmethod
    def of_model(cls, args: dict[str, str]) -> ModelParams:
        """A running model's, from the ``args`` Triton hands its ``initialize()``."""
        return cls.from_params(bootstrap.model_params(args["model_config"]))


def local_instance_env(
    base_source: str | Path, shared_dir: str | Path, env_source: str | Path | None = None
) -> dict[str, str]:
    """The instance environment of a server we start here: shared files under ``shared_dir``,
    the base from ``base_source``, the shared base's Python environment ``env_source`` (default:
    this interpreter's, which has avatarforge and torch)."""
    return {
        bootstrap.ENV_SHARED_DIR: str(shared_dir),
        bootstrap.ENV_BASE_SOURCE: str(base_source),
        bootstrap.ENV_ENV_SOURCE: str(env_source or sys.prefix),
    }
