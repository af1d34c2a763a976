"""The avatar quality metric, as pure functions of face embeddings.

Every generated image is scored against the user's kept photos (the references):

- **face found**: the detector finds a face in it at all;
- **distance**: the median Euclidean distance of its face's embedding to the references' (the
  median: one odd reference photo does not decide); **match**: distance <= threshold (0.6);
- an **identity** image (prompt with the user's token) should match: its share of matches is
  the identity score, an image without a face counting as a miss;
- a **leakage** image (the class prompt, no token, same adapter loaded) must not match: the
  share of its faces that do is the leak rate — the adapter painting the user into every face.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .embedding import THRESHOLD

IDENTITY, LEAKAGE = "identity", "leakage"


@dataclass(frozen=True)
class ImageScore:
    """One generated image's score."""

    kind: str  # IDENTITY or LEAKAGE
    prompt: str
    seed: int
    face: bool
    distance: float | None  # median distance to the references; None without a face
    match: bool | None  # distance <= threshold; None without a face
    file: str = ""  # where the image was written, relative to the report

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def distances_to(vector: np.ndarray, references: Sequence[np.ndarray]) -> np.ndarray:
    """Euclidean distance of ``vector`` to each reference embedding."""
    if not len(references):
        raise ValueError("no reference embeddings to compare with")
    return np.linalg.norm(np.asarray(references) - np.asarray(vector), axis=1)


def identity_distance(vector: np.ndarray, references: Sequence[np.ndarray]) -> float:
    """The median distance of ``vector`` to the references: how far the face is from the user."""
    return float(np.median(distances_to(vector, references)))


def score_image(
    kind: str,
    prompt: str,
    seed: int,
    vector: np.ndarray | None,
    references: Sequence[np.ndarray],
    threshold: float = THRESHOLD,
    file: str = "",
) -> ImageScore:
    """Score one image's face embedding (None: no face found) against the references."""
    if kind not in (IDENTITY, LEAKAGE):
        raise ValueError(f"kind must be {IDENTITY!r} or {LEAKAGE!r} (got {kind!r})")
    if vector is None:
        return ImageScore(kind, prompt, seed, False, None, None, file)
    d = identity_distance(vector, references)
    return ImageScore(kind, prompt, seed, True, round(d, 4), d <= threshold, file)


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def summarize(scores: Sequence[ImageScore]) -> dict[str, Any]:
    """The report's scores: face-found rate, identity (match rate, distances), leakage."""
    identity = [s for s in scores if s.kind == IDENTITY]
    leakage = [s for s in scores if s.kind == LEAKAGE]
    id_faces = [s for s in identity if s.face]
    leak_faces = [s for s in leakage if s.face]
    id_distances = [s.distance for s in id_faces if s.distance is not None]
    leak_distances = [s.distance for s in leak_faces if s.distance is not None]
    return {
        "images": len(scores),
        "face_found_rate": _rate(sum(s.face for s in scores), len(scores)),
        "identity": {
            "images": len(identity),
            "faces": len(id_faces),
            # the headline: an image without a face is a miss
            "match_rate": _rate(sum(bool(s.match) for s in identity), len(identity)),
            "match_rate_of_faces": _rate(sum(bool(s.match) for s in id_faces), len(id_faces)),
            "mean_distance": _mean(id_distances),
            "median_distance": round(statistics.median(id_distances), 4) if id_distances else None,
        },
        "leakage": {
            "images": len(leakage),
            "faces": len(leak_faces),
            # lower is better; undefined (None) when no class image shows a face
            "leak_rate": _rate(sum(bool(s.match) for s in leak_faces), len(leak_faces)),
            "mean_distance": _mean(leak_distances),
            "min_distance": round(min(leak_distances), 4) if leak_distances else None,
        },
    }
