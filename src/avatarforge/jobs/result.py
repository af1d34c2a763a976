"""The result of a finished job: what the async endpoint writes to its S3OutputPath.

::

    {"job_id": "...", "user": "alice", "status": "succeeded",
     "target_model": "alice.tar.gz", "model_uri": "s3://bucket/models/alice.tar.gz",
     "tarball_bytes": 123456, "tarball_sha256": "...", "adapter_bytes": 120000,
     "steps": 800, "resumed_from": 0,
     "seconds": {"fetch": .., "preprocess": .., "train": .., "package": .., "upload": ..,
                 "total": ..},
     "photos": {"kept": ["a.jpg", ...], "rejected": [{"source": "b.jpg", "reason": "..."}]},
     "base": {"base_id": "...", "content_hash": "..."},
     "avatarforge_version": "0.1.0"}

The same document is stored at ``<work_prefix><job_id>/result.json`` after the tarball upload:
a job id that has one is done, and submitting it again returns it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Self

STAGES = ("fetch", "preprocess", "train", "package", "upload", "total")
SUCCEEDED = "succeeded"


@dataclass
class JobResult:
    job_id: str
    user: str
    target_model: str
    model_uri: str
    tarball_bytes: int
    tarball_sha256: str
    adapter_bytes: int
    steps: int
    resumed_from: int
    seconds: dict[str, float]
    photos: dict[str, Any]  # {"kept": [source], "rejected": [{"source", "reason"}]}
    base: dict[str, str]  # {"base_id", "content_hash"}
    avatarforge_version: str
    status: str = SUCCEEDED
    extra: dict[str, Any] = field(default_factory=dict)  # fields of a newer writer, kept

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "user": self.user,
            "status": self.status,
            "target_model": self.target_model,
            "model_uri": self.model_uri,
            "tarball_bytes": self.tarball_bytes,
            "tarball_sha256": self.tarball_sha256,
            "adapter_bytes": self.adapter_bytes,
            "steps": self.steps,
            "resumed_from": self.resumed_from,
            "seconds": {k: self.seconds[k] for k in STAGES if k in self.seconds},
            "photos": self.photos,
            "base": self.base,
            "avatarforge_version": self.avatarforge_version,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Read a stored result; ValueError names what is missing or not a success."""
        names = [n for n in cls.__dataclass_fields__ if n != "extra"]
        missing = [n for n in names if n not in data and n != "status"]
        if missing:
            raise ValueError(f"job result lacks {', '.join(missing)}")
        if data.get("status", SUCCEEDED) != SUCCEEDED:
            raise ValueError(f"job result has status {data.get('status')!r}, not {SUCCEEDED!r}")
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**{n: data[n] for n in names if n in data}, extra=extra)
