"""The evaluation report (report.json) and what it says about itself.

On a base of random weights (the embedded tiny base, the full-size random SD 2.1 of the
benchmarks) the generated images are textures, not faces: the report says that it measures
nothing, in so many words, whatever numbers it holds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from .embedding import MODEL_NAME
from .metric import ImageScore

REPORT_FILE = "report.json"
GRID_FILE = "grid.png"
METRIC = (
    "median Euclidean distance of a generated face's 128-d dlib embedding to the user's kept "
    "photos; a match is a distance at or below the threshold"
)


def random_base_reason(base_id: str) -> str | None:
    """Why scores on this base mean nothing (a base of random weights), or None for a real one."""
    from ..base.tiny import TINY_ID_PREFIX
    from ..fullsize import FULL_ID_PREFIX

    if base_id.startswith((TINY_ID_PREFIX, FULL_ID_PREFIX)):
        return (
            f"this measures nothing: the base {base_id} has random weights (a test base), so "
            "its images are noise-like textures, not faces: its scores say nothing about "
            "the adapter. Evaluate an adapter trained on real SD 2.1 weights."
        )
    return None


@dataclass
class EvalReport:
    user: str
    adapter: str
    base_id: str
    base_hash: str
    token: str
    threshold: float
    measures_nothing: bool
    why: str | None  # the reason it measures nothing, or None
    references: list[dict[str, Any]]
    scores: dict[str, Any]
    images: list[dict[str, Any]]
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    embedding: str = MODEL_NAME
    metric: str = METRIC
    avatarforge_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, out_dir: Path) -> Path:
        path = Path(out_dir) / REPORT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def notes_for(scores: dict[str, Any], image_scores: list[ImageScore]) -> list[str]:
    """Plain sentences about what the scores cannot say (no faces, no leakage faces...)."""
    notes = []
    if image_scores and not any(s.face for s in image_scores):
        notes.append("no face was found in any generated image: identity and leakage undefined")
    elif scores["leakage"]["faces"] == 0 and scores["leakage"]["images"]:
        notes.append("no face in the class-prompt images: leakage undefined")
    return notes
