"""ServiceConfig: the training service's settings, one per instance, read from the environment.

The DJL container and the local runners take their settings from ``AVATARFORGE_SERVICE_<FIELD>``
environment variables (:meth:`ServiceConfig.from_env`), so one image serves any deployment.
Training and preprocessing defaults are presets (JSON objects of TrainConfig/PreprocessConfig
fields); a request's bounded overrides apply on top of them.

Where a job may read and write is the deployment's, not the request's: ``s3_prefix`` is the
deployment's ``s3://<bucket>/<prefix>`` (deploy's layout), and a job reads photos only under
``photos/<user>/`` of it, writes the model to ``models/`` and its checkpoint, claim and result
under ``jobs/``. Without it the service refuses every job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from ..paths import build_dir
from ..settings import ConfigError, Settings, setting

ENV_PREFIX = "AVATARFORGE_SERVICE_"
# a bucket name, then a key prefix of AWS's safe characters ending in '/' (deploy's layout)
_S3_PREFIX = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/(?:[A-Za-z0-9!_.*'()-]+/)*$")
# Decided by the job, not by a preset: the base is the service's, resume is always on.
JOB_CONTROLLED_TRAIN = frozenset({"base", "resume", "max_steps_this_run"})


@dataclass
class ServiceConfig(Settings):
    """Settings of one training-service instance (an LMI container, a local runner)."""

    section = "service"

    base_source: str = setting(
        "tiny",
        "the base it trains on, the SAME one the MME serves: 'tiny', a diffusers folder, or a "
        "tarball path / s3:// URI of the base tarball (fetched once into shared_dir)",
    )
    s3_prefix: str = setting(
        "",
        "the deployment's s3://bucket/prefix/: photos are read only from photos/<user>/ under "
        "it, models written to models/, checkpoints and results to jobs/; empty: every job is "
        "refused",
    )
    shared_dir: str = setting("", "where a fetched base is kept; empty: build/service/shared")
    work_dir: str = setting("", "local scratch of running jobs; empty: build/service/work")
    slots_dir: str = setting(
        "",
        "lock files of the training slots (shared by all worker processes); empty: "
        "build/service/slots",
    )
    max_concurrent_jobs: int = setting(
        2, "jobs that train at once on this instance; more wait for a slot", ge=1, le=64
    )
    deadline_s: float = setting(
        3300.0,
        "a job's time budget from its start (below the async InvocationTimeoutSeconds, max 3600)",
        ge=1.0,
        le=3600.0,
    )
    finish_reserve_s: float = setting(
        120.0,
        "of deadline_s, the time kept to save a checkpoint, package and upload after training "
        "stops",
        ge=0.0,
        le=1800.0,
    )
    max_photos: int = setting(30, "most photos in one job (checked on the listing)", ge=1, le=1000)
    max_photo_bytes: int = setting(
        20 * 2**20, "largest photo in bytes (checked on the listing)", ge=1, le=2**30
    )
    max_total_photo_bytes: int = setting(
        200 * 2**20, "most bytes of photos in one job (checked on the listing)", ge=1, le=16 * 2**30
    )
    # setting() gives a dict default its own default_factory (RUF009 cannot see that)
    train_defaults: dict = setting(  # noqa: RUF009
        {}, "the service's training preset: TrainConfig fields as a JSON object"
    )
    preprocess_defaults: dict = setting(  # noqa: RUF009
        {}, "the service's preprocessing preset: PreprocessConfig fields as a JSON object"
    )

    def validate(self) -> None:
        from ..preprocess import PreprocessConfig
        from ..train import TrainConfig

        if self.s3_prefix and not _S3_PREFIX.fullmatch(self.s3_prefix):
            raise ConfigError(
                "service.s3_prefix: s3://<bucket>/<prefix>/ with a trailing '/' and AWS's safe "
                f"key characters (got {self.s3_prefix!r})"
            )

        if self.finish_reserve_s >= self.deadline_s:
            raise ConfigError(
                f"service.finish_reserve_s: must be below deadline_s ({self.deadline_s:g}); "
                f"got {self.finish_reserve_s:g}"
            )
        for name, cls in (
            ("train_defaults", TrainConfig),
            ("preprocess_defaults", PreprocessConfig),
        ):
            preset = getattr(self, name)
            if not isinstance(preset, dict):
                raise ConfigError(f"service.{name}: must be a JSON object (got {preset!r})")
            if name == "train_defaults" and (taken := sorted(JOB_CONTROLLED_TRAIN & set(preset))):
                raise ConfigError(
                    f"service.train_defaults: {', '.join(taken)} are set by the job, not a preset"
                )
            try:
                cls.from_dict(preset)
            except (ConfigError, TypeError) as exc:
                raise ConfigError(f"service.{name}: {exc}") from None

    # ------------------------------------------------------------ where jobs read and write

    def _under(self, part: str) -> str:
        if not self.s3_prefix:
            raise ConfigError(
                f"service.s3_prefix: not set ({self.env_name('s3_prefix')}): the service reads "
                "and writes only under the deployment's prefix, and knows none"
            )
        return self.s3_prefix + part

    @property
    def photos_prefix(self) -> str:
        """``<s3_prefix>photos/``: a user's photos lie under ``<user>/`` of it."""
        return self._under("photos/")

    @property
    def models_prefix(self) -> str:
        """``<s3_prefix>models/``: the MME prefix, the only place a model is written."""
        return self._under("models/")

    @property
    def jobs_prefix(self) -> str:
        """``<s3_prefix>jobs/``: each job's checkpoint, claim and result under ``<job_id>/``."""
        return self._under("jobs/")

    # ------------------------------------------------------------ folders

    def work_path(self) -> Path:
        return Path(self.work_dir or build_dir() / "service" / "work")

    def shared_path(self) -> Path:
        return Path(self.shared_dir or build_dir() / "service" / "shared")

    def slots_path(self) -> Path:
        return Path(self.slots_dir or build_dir() / "service" / "slots")

    # ------------------------------------------------------------ environment

    @classmethod
    def env_name(cls, field: str) -> str:
        return ENV_PREFIX + field.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """The config from ``AVATARFORGE_SERVICE_<FIELD>`` variables; defaults for the rest.

        Numbers and booleans are parsed, the presets are JSON objects; a bad value raises
        :class:`ConfigError` naming the variable.
        """
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = cls.env_name(f.name)
            if name not in environ:
                continue
            try:
                values[f.name] = _parse(environ[name], hints[f.name])
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment that :meth:`from_env` reads back as this config (for subprocesses)."""
        out = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                value = json.dumps(value, sort_keys=True)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            out[self.env_name(key)] = str(value)
        return out


def _parse(text: str, kind: type) -> Any:
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false (got {text!r})")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer (got {text!r})") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number (got {text!r})") from None
    if kind is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"expected a JSON object ({exc})") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object (got {text!r})")
        return value
    return text
