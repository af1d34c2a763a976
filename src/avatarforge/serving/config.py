"""Settings of the served models, and where each one comes from.

Two kinds of settings, kept apart on purpose:

- **per package**: what identifies a user model (the base id and hash its adapter was trained
  on) and its rows per request (``serving.max_batch_size``), rendered into its config.pbtxt
  by :mod:`.triton_config`. No machine paths: a package runs on any instance.
- **per instance**, from the server's process environment only: where the shared files live
  and where they come from (see :mod:`avatarforge.serving.bootstrap`: AVATARFORGE_SHARED_DIR,
  AVATARFORGE_BASE_SOURCE, ...), and every other field of :class:`ServingConfig`, the shared
  base's limits and resources (``AVATARFORGE_SERVING_<FIELD>``: :meth:`ServingConfig.from_env`).
  The shared base is one process per base hash that serves every user: a package must not set
  its limits (a request budget of 1e6, a timeout of a day) for everyone, nor where its files
  come from. :func:`local_instance_env` makes that environment for the servers we start here.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..generate import GenArgs, serving_defaults
from ..names import SHARED_BASE_PREFIX
from ..settings import ConfigError, Settings, setting
from . import bootstrap, schema

# Config parameter names.
P_ENV_PATH = "EXECUTION_ENV_PATH"  # Triton's own: the Python environment of a model
P_BASE_ID = "BASE_ID"
P_BASE_HASH = "BASE_HASH"

SD_BASE_PREFIX = SHARED_BASE_PREFIX  # + base hash: one shared process per base
MAX_REQUEST_COST = 600  # see ServingConfig.max_request_cost
REQUEST_TIMEOUT_S = bootstrap.DEFAULT_REQUEST_TIMEOUT_S  # the user model reads it too
# InvokeEndpoint's response Body limit (and its request Body's): 6 MB
MAX_RESPONSE_BYTES = 6 * 1024 * 1024
ADAPTER_CACHE_SIZE = 16  # adapters loaded the old way (the slots' fallback), unless configured
# 1024 default-rank SD 2.1 adapters (6.11 MiB each in fp16) page-locked for a GPU, where torch
# rounds each pinned block up to a power of two (8 MiB); 1340 of them on a CPU
ADAPTER_CACHE_MIB = 8192
BATCH_MAX_IMAGES = 8  # images per batched pipeline call, and LoRA slots on the shared base
ENV_PREFIX = "AVATARFORGE_SERVING_"  # + field name, upper case: the instance's settings
PACKAGED = ("max_batch_size",)  # the fields a package sets; every other is the instance's


@dataclass
class ServingConfig(Settings):
    """The serving settings: ``max_batch_size`` is a package's (its user model's config);
    every other field is the instance's, read from ``AVATARFORGE_SERVING_<FIELD>``
    (:meth:`from_env`) by the shared base and, for the timeout, by the user models."""

    section = "serving"
    # at most the shared base's batch size: a user model forwards whole requests to it
    max_batch_size: int = setting(
        schema.MAX_BATCH_SIZE,
        "rows per request (per package: the user model's config)",
        ge=1,
        le=schema.MAX_BATCH_SIZE,
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
    default_steps: int = setting(
        0,
        "denoising steps of a request that leaves gen_args.steps out; 0: by device and base "
        "(30, the SD 2.1 base's; 12 for the embedded tiny base on a CPU, which a busy 2-core "
        "CPU finishes within the 60 s of request_timeout_s)",
        ge=0,
        le=150,
    )
    default_size: int = setting(
        0,
        "height and width (pixels, a multiple of 8) of a request that leaves them out; 0: by "
        "device and base (512; 256 for the embedded tiny base on a CPU)",
        ge=0,
        le=1024,
    )
    max_response_bytes: int = setting(
        MAX_RESPONSE_BYTES,
        "largest answer a request may ask for, in bytes of KServe v2 JSON (SageMaker's "
        "InvokeEndpoint response limit is 6 MB); bounded before any work by rows x num_images "
        "x the largest base64 JPEG of that size (measured on noise at quality 95)",
        ge=65536,
        le=2**31,
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
    safety_checker: str = setting(
        "",
        "an image safety check of every answer (avatarforge.serving.safety): a "
        "StableDiffusionSafetyChecker folder (its config, weights and CLIP image processor), a "
        "tarball of one, or its s3:// URI (fetched once into the shared dir); a flagged image "
        "is replaced by a black one and counted, never returned. Empty: off, because SD 2.x "
        "ships no checker: its training data was filtered by LAION's NSFW classifier instead",
    )
    metrics_log_s: int = setting(
        60,
        "seconds between the shared base's log lines of request counts per user in CloudWatch "
        "embedded metric format (SageMaker sends the container's log to CloudWatch; its "
        "metrics port is off); 0: none",
        ge=0,
        le=86400,
    )

    def validate(self) -> None:
        if not isinstance(self.batching, bool):
            raise ConfigError(f"serving.batching: must be true or false (got {self.batching!r})")
        if self.default_size and (self.default_size < 64 or self.default_size % 8):
            raise ConfigError(
                "serving.default_size: 0 (by device and base) or a multiple of 8 from 64 "
                f"(got {self.default_size})"
            )

    def gen_defaults(self, *, tiny_on_cpu: bool) -> GenArgs:
        """What an omitted gen_args field takes on this instance (:func:`serving_defaults`)."""
        return serving_defaults(
            tiny_on_cpu=tiny_on_cpu, steps=self.default_steps, size=self.default_size
        )

    @staticmethod
    def env_name(field: str) -> str:
        """``request_timeout_s`` -> ``AVATARFORGE_SERVING_REQUEST_TIMEOUT_S``."""
        return ENV_PREFIX + field.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingConfig:
        """The instance's settings from ``AVATARFORGE_SERVING_<FIELD>`` (defaults for the
        rest; a package's fields are not read); a bad value is a ConfigError naming it."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            text = environ.get(cls.env_name(f.name))
            if f.name in PACKAGED or text is None or not text.strip():
                continue
            try:
                if isinstance(f.default, bool):
                    values[f.name] = flag(text, f.default)
                elif isinstance(f.default, int):
                    values[f.name] = int(text)
                else:
                    values[f.name] = text.strip()
                cls(**{f.name: values[f.name]})  # its bounds, named by the variable
            except (ValueError, ConfigError) as exc:
                raise ConfigError(f"{cls.env_name(f.name)}={text!r}: {exc}") from None
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The instance environment that :meth:`from_env` reads back as this config."""
        return {
            self.env_name(f.name): str(v).lower() if isinstance(v := getattr(self, f.name), bool)
            else str(v)
            for f in dataclasses.fields(self)
            if f.name not in PACKAGED
        }  # fmt: skip


def flag(text: str | None, default: bool) -> bool:
    """A boolean setting's text: true/false, 1/0, yes/no, on/off."""
    if text is None or not text.strip():
        return default
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{text!r} is not true or false")


@dataclass(frozen=True)
class ModelParams:
    """Every parameter of a config we render, typed: the one place they are written
    (:meth:`to_params`, which :mod:`.triton_config` renders into config.pbtxt and the shared
    base's config) and read back (:meth:`from_params`: a running model, the package check).
    A user model reads its BASE_HASH itself (:func:`.bootstrap.model_params`: it runs under the
    image's bare Python, without avatarforge). No serving settings: those are the instance's
    (:meth:`ServingConfig.from_env`), so no config a package carries can set them."""

    base_id: str = ""
    base_hash: str = ""
    env_path: str = ""  # EXECUTION_ENV_PATH: the instance's serving environment, never packaged

    def to_params(self) -> dict[str, str]:
        """Parameter name -> text; empty values are left out (Triton's configs omit them)."""
        params = {P_ENV_PATH: self.env_path, P_BASE_ID: self.base_id, P_BASE_HASH: self.base_hash}
        return {k: v for k, v in params.items() if v != ""}

    @classmethod
    def from_params(cls, params: dict[str, str]) -> ModelParams:
        """What :meth:`to_params` wrote (other parameters are ignored)."""
        get = params.get
        return cls(get(P_BASE_ID, ""), get(P_BASE_HASH, ""), get(P_ENV_PATH, ""))

    @classmethod
    def of_model(cls, args: dict[str, str]) -> ModelParams:
        """A running model's, from the ``args`` Triton hands its ``initialize()``."""
        return cls.from_params(bootstrap.model_params(args["model_config"]))


def local_instance_env(
    base_source: str | Path,
    shared_dir: str | Path,
    env_source: str | Path | None = None,
    serving: ServingConfig | None = None,
) -> dict[str, str]:
    """The instance environment of a server we start here: shared files under ``shared_dir``,
    the base from ``base_source``, the shared base's Python environment ``env_source`` (default:
    this interpreter's, which has avatarforge and torch), and ``serving``'s instance settings
    (default: none set, the defaults apply)."""
    return {
        bootstrap.ENV_SHARED_DIR: str(shared_dir),
        bootstrap.ENV_BASE_SOURCE: str(base_source),
        bootstrap.ENV_ENV_SOURCE: str(env_source or sys.prefix),
        **(serving.to_env() if serving is not None else {}),
    }


# the instance's fields of ServingConfig (every field but the PACKAGED ones)
INSTANCE_FIELDS = tuple(f.name for f in dataclasses.fields(ServingConfig) if f.name not in PACKAGED)
