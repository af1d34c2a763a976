"""A user's local photo folder, checked against the training service's limits before upload.

The service checks its S3 listing against the same kind of limits before it downloads
anything; checking here first turns a refused job an hour later into an error now, before a
byte is uploaded. Every regular, non-hidden file is a photo candidate: the service's preprocess
step decides what is usable and reports why the rest was rejected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..errors import AvatarforgeError
from ..jobs.config import ServiceConfig

# The service's defaults (read from the fields: building a ServiceConfig imports the trainer).
_SERVICE = {f.name: f.default for f in dataclasses.fields(ServiceConfig)}


class PhotoError(AvatarforgeError, ValueError):
    """The photo folder cannot be submitted; the message names the file or the limit."""

    status = 400


@dataclass(frozen=True)
class PhotoLimits:
    """Defaults: the training service's (ServiceConfig max_photos, max_photo_bytes,
    max_total_photo_bytes)."""

    max_photos: int = _SERVICE["max_photos"]
    max_photo_bytes: int = _SERVICE["max_photo_bytes"]
    max_total_bytes: int = _SERVICE["max_total_photo_bytes"]


def local_photos(folder: Path, limits: PhotoLimits | None = None) -> list[Path]:
    """The files to upload from ``folder`` (sorted); :class:`PhotoError` when a limit breaks."""
    limits = limits or PhotoLimits()
    folder = Path(folder)
    if not folder.is_dir():
        raise PhotoError(f"photos: {folder} is not a folder (give a folder or an s3:// prefix)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise PhotoError(f"photos: no files in {folder}")
    if len(files) > limits.max_photos:
        raise PhotoError(
            f"photos: {len(files)} files in {folder}, more than the limit of {limits.max_photos}"
        )
    total = 0
    for path in files:
        size = path.stat().st_size
        if size > limits.max_photo_bytes:
            raise PhotoError(
                f"photos: {path} is {size / 2**20:.1f} MiB, more than "
                f"{limits.max_photo_bytes / 2**20:.0f} MiB per photo"
            )
        total += size
    if total > limits.max_total_bytes:
        raise PhotoError(
            f"photos: {total / 2**20:.0f} MiB in {folder}, more than "
            f"{limits.max_total_bytes / 2**20:.0f} MiB in all"
        )
    return files
