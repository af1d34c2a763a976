"""The job request: one JSON schema, parsed and bounded before anything runs.

::

    {"job_id": "j-2026-11-27-0001",              a job id (avatarforge.names)
     "user": "alice",                            a user id: the S3 key and Triton model name
     "photos": "s3://bucket/photos/alice/j1/"    a prefix, or a list of s3://bucket/key URIs
     "models_prefix": "s3://bucket/models/",     the MME prefix: <user>.tar.gz is written here
     "work_prefix": "s3://bucket/jobs/",         optional: checkpoint and result of each job
     "train": {"steps": 800},                    optional, bounded overrides of the preset
     "preprocess": {"min_images": 5}}            optional, bounded overrides of the preset

Unknown fields, fields a request may not set and values out of bounds are refused with a
message naming the field. The bounds are tighter than the configs' own: the service shares a
GPU between users, so no request may ask for hours of training or gigabytes of adapter.

Where a job reads and writes is the deployment's (``ServiceConfig.s3_prefix``), not the
caller's: ``models_prefix`` (and ``work_prefix``, when given) must be the deployment's, and the
photos must lie under ``<s3_prefix>photos/<user>/`` (not another user's, not another bucket).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..names import InvalidNameError, check_job_id, check_user_id
from ..settings import ConfigError
from .config import ServiceConfig
from .errors import JobError, JobRequestError

MAX_REQUEST_BYTES = 256 * 1024  # a request names photos, it does not carry them
FIELDS = ("job_id", "user", "photos", "models_prefix", "work_prefix", "train", "preprocess")
REQUIRED = ("job_id", "user", "photos", "models_prefix")

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Prefixes we write under: AWS's "safe" key characters only.
_SAFE_PREFIX = re.compile(r"^[A-Za-z0-9!_.*'()/-]*$")


@dataclass(frozen=True)
class Bound:
    """What a request may set for one config field: its type and a range (or a length)."""

    kind: type
    ge: float | None = None
    le: float | None = None
    max_len: int = 0  # strings


TRAIN_OVERRIDES: dict[str, Bound] = {
    "steps": Bound(int, 1, 3000),
    "resolution": Bound(int, 64, 768),
    "learning_rate": Bound(float, 1e-7, 1e-2),
    "lr_warmup_steps": Bound(int, 0, 1000),
    "batch_size": Bound(int, 1, 4),
    "gradient_accumulation": Bound(int, 1, 8),
    "unet_rank": Bound(int, 1, 64),
    "unet_alpha": Bound(float, 0.0, 128.0),
    "train_text_encoder": Bound(bool),
    "text_encoder_rank": Bound(int, 1, 64),
    "text_encoder_alpha": Bound(float, 0.0, 128.0),
    "prior_preservation": Bound(bool),
    "prior_loss_weight": Bound(float, 0.0, 10.0),
    "num_class_images": Bound(int, 1, 200),
    "class_image_steps": Bound(int, 1, 50),
    "class_image_guidance": Bound(float, 0.0, 20.0),
    "seed": Bound(int, 0, 2**31),
    "token": Bound(str, max_len=32),
    "instance_prompt": Bound(str, max_len=200),
    "class_prompt": Bound(str, max_len=200),
}
PREPROCESS_OVERRIDES: dict[str, Bound] = {
    "min_images": Bound(int, 1, 50),
    "backgrounds": Bound(int, 0, 4),
    "keep_original": Bound(bool),
    "margin": Bound(float, 0.2, 2.0),
    "duplicate_distance": Bound(int, -1, 16),
    "seed": Bound(int, 0, 2**31),
}


@dataclass(frozen=True)
class JobRequest:
    """A validated, normalised request (prefixes end in '/', work_prefix filled in)."""

    job_id: str
    user: str
    photos: str | tuple[str, ...]  # a prefix ending in '/', or object URIs
    models_prefix: str
    work_prefix: str
    train: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)

    @property
    def target_model(self) -> str:
        """The MME TargetModel of the user: ``<user>.tar.gz``."""
        return f"{self.user}.tar.gz"

    @property
    def model_uri(self) -> str:
        return self.models_prefix + self.target_model

    @property
    def job_prefix(self) -> str:
        """``<work_prefix><job_id>/``: the job's checkpoint and result live here."""
        return f"{self.work_prefix}{self.job_id}/"

    @property
    def checkpoint_uri(self) -> str:
        return self.job_prefix + "checkpoint.tar.gz"

    @property
    def result_uri(self) -> str:
        return self.job_prefix + "result.json"

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "user": self.user,
            "photos": self.photos if isinstance(self.photos, str) else list(self.photos),
            "models_prefix": self.models_prefix,
            "work_prefix": self.work_prefix,
            "train": dict(self.train),
            "preprocess": dict(self.preprocess),
        }


def parse_request(data: bytes | str | dict, config: ServiceConfig) -> JobRequest:
    """A :class:`JobRequest` from JSON bytes/text or a decoded object; :class:`JobRequestError`
    naming the field for anything malformed, unknown or out of bounds."""
    obj = _decode(data)
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise JobRequestError(
            f"unknown field(s) {', '.join(map(repr, unknown))} (a request has: {', '.join(FIELDS)})"
        )
    missing = [name for name in REQUIRED if name not in obj]
    if missing:
        raise JobRequestError(f"missing required field(s): {', '.join(missing)}")
    try:
        job_id = check_job_id(obj["job_id"])
        user = check_user_id(obj["user"])
    except InvalidNameError as exc:
        raise JobRequestError(str(exc)) from None
    photos = _photos(obj["photos"], config.max_photos)
    models_prefix = _prefix(obj["models_prefix"], "models_prefix")
    work_prefix = _work_prefix(obj.get("work_prefix"), models_prefix, config)
    _check_places(user, photos, models_prefix, work_prefix, config)
    train = _overrides(obj.get("train", {}), "train", TRAIN_OVERRIDES)
    preprocess = _overrides(obj.get("preprocess", {}), "preprocess", PREPROCESS_OVERRIDES)
    request = JobRequest(job_id, user, photos, models_prefix, work_prefix, train, preprocess)
    # The merged configs must be valid too (multiple of 8, token in the prompt...): refused
    # here, not an hour into the job.
    train_config(request, config)
    preprocess_config(request, config)
    return request


def train_config(request: JobRequest, config: ServiceConfig, **fixed: Any):
    """The TrainConfig of a job: the service preset, the request's overrides, then ``fixed``."""
    from ..train import TrainConfig

    values = {**config.train_defaults, **request.train, "progress": False, **fixed}
    try:
        return TrainConfig.from_dict(values)
    except ConfigError as exc:
        raise JobRequestError(str(exc)) from None


def preprocess_config(request: JobRequest, config: ServiceConfig):
    from ..preprocess import PreprocessConfig

    try:
        return PreprocessConfig.from_dict({**config.preprocess_defaults, **request.preprocess})
    except ConfigError as exc:
        raise JobRequestError(str(exc)) from None


# ---------------------------------------------------------------- parts


def _decode(data: bytes | str | dict) -> dict[str, Any]:
    if isinstance(data, dict):
        return data
    if isinstance(data, bytes | bytearray | memoryview):
        data = bytes(data)
        if len(data) > MAX_REQUEST_BYTES:
            raise JobRequestError(
                f"request: {len(data)} bytes, more than {MAX_REQUEST_BYTES} (photos are named "
                "by S3 URI, not sent in the request)"
            )
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JobRequestError(f"request: not UTF-8 text ({exc})") from None
    if not isinstance(data, str):
        raise JobRequestError(f"request: expected JSON, got {type(data).__name__}")
    if len(data) > MAX_REQUEST_BYTES:
        raise JobRequestError(f"request: {len(data)} characters, more than {MAX_REQUEST_BYTES}")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # also an int past 4300 digits, deep nesting
        raise JobRequestError(f"request: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise JobRequestError(f"request: expected a JSON object, got {type(obj).__name__}")
    return obj


def _split(uri: object, name: str) -> tuple[str, str]:
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise JobRequestError(f"{name}: expected an s3://bucket/... URI (got {uri!r})")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not _BUCKET.match(bucket):
        raise JobRequestError(f"{name}: {bucket!r} is not a valid S3 bucket name (in {uri!r})")
    if len(key.encode()) > 1024:
        raise JobRequestError(f"{name}: key longer than S3's 1024 bytes (in {uri[:80]!r}...)")
    if any(ord(c) < 32 or c in "\\\x7f" for c in key):
        raise JobRequestError(f"{name}: control characters or '\\' in the key of {uri!r}")
    parts = key.split("/")
    if key.startswith("/") or any(p in (".", "..") for p in parts) or "//" in key:
        raise JobRequestError(f"{name}: key has an empty, '.' or '..' segment ({uri!r})")
    return bucket, key


def _prefix(uri: object, name: str, *, allow_root: bool = True) -> str:
    """``s3://bucket/some/prefix/`` (trailing '/' added), safe characters only."""
    bucket, key = _split(uri, name)
    if not _SAFE_PREFIX.match(key):
        raise JobRequestError(
            f"{name}: use letters, digits and !_.*'()/- in a prefix we write under (got {uri!r})"
        )
    if key and not key.endswith("/"):
        key += "/"
    if not key and not allow_root:
        raise JobRequestError(f"{name}: give a prefix inside the bucket, not its root ({uri!r})")
    return f"s3://{bucket}/{key}"


def _deployment(config: ServiceConfig) -> tuple[str, str, str]:
    """The deployment's photos, models and jobs prefixes (a service without them is ours to
    fix: a 500, not the caller's 400)."""
    try:
        return config.photos_prefix, config.models_prefix, config.jobs_prefix
    except ConfigError as exc:
        raise JobError(f"the training service is misconfigured: {exc}") from None


def _work_prefix(value: object, models_prefix: str, config: ServiceConfig) -> str:
    prefix = _deployment(config)[2] if value is None else _prefix(value, "work_prefix")
    # either inside the other: a job id names a key of the other (work_prefix s3://b/af/ and
    # job_id "models" wrote checkpoint.tar.gz as the model of a user "checkpoint", and deleted
    # it when the job succeeded)
    if prefix.startswith(models_prefix) or models_prefix.startswith(prefix):
        inside = "lies inside" if prefix.startswith(models_prefix) else "holds"
        raise JobRequestError(
            f"work_prefix: {prefix!r} {inside} models_prefix {models_prefix!r}; the MME prefix "
            "holds only <user>.tar.gz models, and no job id may name one of its keys"
        )
    return prefix


def _check_places(
    user: str,
    photos: str | tuple[str, ...],
    models_prefix: str,
    work_prefix: str,
    config: ServiceConfig,
) -> None:
    """Only the deployment's prefixes: a request names no other bucket, prefix or user."""
    photos_root, models, jobs = _deployment(config)
    if models_prefix != models:
        raise JobRequestError(
            f"models_prefix: {models_prefix!r} is not this deployment's models prefix "
            f"({models!r}); a job writes models only there"
        )
    if work_prefix != jobs:
        raise JobRequestError(
            f"work_prefix: {work_prefix!r} is not this deployment's jobs prefix ({jobs!r})"
        )
    own = f"{photos_root}{user}/"
    for i, uri in enumerate([photos] if isinstance(photos, str) else photos):
        if not uri.startswith(own):
            name = "photos" if isinstance(photos, str) else f"photos[{i}]"
            raise JobRequestError(
                f"{name}: {uri!r} is not under {own!r}: a job reads only its own user's photos, "
                "uploaded under the deployment's photos prefix"
            )


def _photos(value: object, max_photos: int) -> str | tuple[str, ...]:
    if isinstance(value, str):
        bucket, key = _split(value, "photos")
        if not key:
            raise JobRequestError(
                f"photos: give a prefix inside the bucket, not its root ({value!r})"
            )
        return f"s3://{bucket}/{key if key.endswith('/') else key + '/'}"
    if not isinstance(value, list):
        raise JobRequestError(
            f"photos: expected an s3:// prefix or a list of s3:// URIs (got {type(value).__name__})"
        )
    if not value:
        raise JobRequestError("photos: the list is empty")
    if len(value) > max_photos:
        raise JobRequestError(
            f"photos: {len(value)} URIs, more than the limit of {max_photos} (service max_photos)"
        )
    seen: dict[str, int] = {}
    for i, uri in enumerate(value):
        _, key = _split(uri, f"photos[{i}]")
        if not key or key.endswith("/"):
            raise JobRequestError(f"photos[{i}]: names a prefix, not an object ({uri!r})")
        name = key.rpartition("/")[2]
        if name in seen:
            raise JobRequestError(
                f"photos[{i}]: same file name {name!r} as photos[{seen[name]}] (names must differ)"
            )
        seen[name] = i
    return tuple(value)


def _overrides(value: object, section: str, allowed: dict[str, Bound]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise JobRequestError(f"{section}: expected a JSON object (got {type(value).__name__})")
    out = {}
    for key, item in value.items():
        name = f"{section}.{key}"
        bound = allowed.get(key)
        if bound is None:
            raise JobRequestError(
                f"{name}: not allowed in a request (allowed: {', '.join(sorted(allowed))})"
            )
        out[key] = _bounded(name, item, bound)
    return out


def _bounded(name: str, value: Any, bound: Bound) -> Any:
    if bound.kind is bool:
        if not isinstance(value, bool):
            raise JobRequestError(f"{name}: expected true or false (got {value!r})")
        return value
    if bound.kind is str:
        if not isinstance(value, str):
            raise JobRequestError(f"{name}: expected a string (got {value!r})")
        if len(value) > bound.max_len:
            raise JobRequestError(f"{name}: at most {bound.max_len} characters (got {len(value)})")
        return value
    # an int is finite however large (math.isfinite would overflow converting it to float)
    finite = not isinstance(value, float) or math.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not finite:
        raise JobRequestError(f"{name}: expected a finite number (got {value!r})")
    if bound.kind is int and not (isinstance(value, int) or float(value).is_integer()):
        raise JobRequestError(f"{name}: expected an integer (got {value!r})")
    if bound.ge is not None and value < bound.ge:
        raise JobRequestError(f"{name}: must be >= {_num(bound.ge)} (got {value!r})")
    if bound.le is not None and value > bound.le:
        raise JobRequestError(f"{name}: must be <= {_num(bound.le)} (got {value!r})")
    return int(value) if bound.kind is int else float(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
