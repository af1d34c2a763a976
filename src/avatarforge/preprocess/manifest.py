"""manifest.json: what was kept, what was rejected and why. The trainer's input contract.

Layout (version 1)::

    {"version": 1, "status": "ok" | "failed" | "running", "error": null | "...",
     "config": {...PreprocessConfig...},
     "items": [{"source": "a.jpg", "status": "kept" | "rejected", "reason": null | "...",
                "image": "images/a.png" | null, "mask": "masks/a.png" | null,
                "face_box": [x0, y0, x1, y1] | null, "crop_box": [...] | null,
                "background": "original" | "solid" | "gradient" | "noise" | null,
                "scores": {...}}, ...],
     "kept": N, "rejected": M, "not_on_sheet": K}

One kept item per output image: a photo kept with ``backgrounds=2`` and ``keep_original``
gives three kept items (same source, face box and mask; backgrounds "original" and two
generated ones). A rejected photo gives one item. ``kept`` / ``rejected`` count items; boxes
are in the source photo's upright pixel coordinates.

``status`` is "ok" only for a finished run with at least ``min_images`` usable photos: a trainer
takes nothing else. "running" is written first (a run that crashed leaves it), "failed" with
``error`` when too few photos were usable: then no images are published (items have null
``image`` and ``mask``) and the manifest and contact sheet only say why. Manifests written
before ``status`` existed have none. ``not_on_sheet`` counts the photos the capped contact
sheet leaves out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VERSION = 1
KEPT, REJECTED = "kept", "rejected"
OK, FAILED, RUNNING = "ok", "failed", "running"  # the manifest's status


@dataclass(frozen=True)
class ManifestItem:
    source: str
    status: str
    reason: str | None = None
    image: str | None = None
    mask: str | None = None
    face_box: list[int] | None = None
    crop_box: list[int] | None = None
    background: str | None = None
    scores: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        # Readers may treat items as the JSON dicts they are stored as.
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Manifest:
    items: list[ManifestItem]
    config: dict[str, Any]
    path: Path | None = None  # where manifest.json lives, once written or loaded
    version: int = VERSION
    status: str = OK
    error: str | None = None  # why the run failed (status FAILED)
    not_on_sheet: int = 0  # photos the capped contact sheet does not show

    @property
    def kept(self) -> list[ManifestItem]:
        return [i for i in self.items if i.status == KEPT]

    @property
    def rejected(self) -> list[ManifestItem]:
        return [i for i in self.items if i.status == REJECTED]

    @property
    def kept_sources(self) -> list[str]:
        """The distinct photos that produced kept images, in order."""
        return list(dict.fromkeys(i.source for i in self.kept))

    @property
    def dir(self) -> Path:
        if self.path is None:
            raise ValueError("manifest has not been written or loaded from a folder")
        return self.path.parent

    def image_paths(self) -> list[Path]:
        """Absolute paths of the kept images (what a trainer reads)."""
        return [self.dir / i.image for i in self.kept if i.image]

    @property
    def content_hash(self) -> str:
        """sha256 of the manifest.json bytes on disk: identifies this dataset."""
        if self.path is None:
            raise ValueError("manifest has not been written yet: no content hash")
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "config": self.config,
            "items": [i.to_dict() for i in self.items],
            "kept": len(self.kept),
            "rejected": len(self.rejected),
            "not_on_sheet": self.not_on_sheet,
        }

    def write(self, dataset_dir: Path) -> Path:
        path = Path(dataset_dir) / "manifest.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)  # a reader never sees half a manifest
        self.path = path
        return path


def load_manifest(dataset_dir: Path) -> Manifest:
    """Read ``dataset_dir/manifest.json`` (or a path to the file itself)."""
    path = Path(dataset_dir)
    if path.is_dir():
        path = path / "manifest.json"
    data = json.loads(path.read_text())
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: manifest version {data.get('version')!r}, expected {VERSION}")
    known = ManifestItem.__dataclass_fields__
    items = [ManifestItem(**{k: v for k, v in d.items() if k in known}) for d in data["items"]]
    return Manifest(
        items=items,
        config=data.get("config", {}),
        path=path,
        status=data.get("status", OK),  # older manifests: judged by the trainer's reader
        error=data.get("error"),
        not_on_sheet=data.get("not_on_sheet", 0),
    )
