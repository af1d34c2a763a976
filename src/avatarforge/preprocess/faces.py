"""Faces: find them with dlib (HOG or CNN), keep the largest, place 68 landmarks on it.

Detection runs on a copy shrunk to ``detect_side`` (a 12 MP phone photo would take seconds
with HOG); boxes and landmarks are scaled back to the photo's own pixel coordinates. Models come
from the ``face-recognition-models`` wheel, found on disk without importing it (its
``__init__`` needs pkg_resources).
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)


@dataclass(frozen=True)
class Face:
    box: Box
    score: float  # detector confidence (HOG margin or CNN confidence)
    landmarks: np.ndarray | None = None  # (68, 2) float x, y in the same frame as box

    @property
    def side(self) -> int:
        """The face's size: the shorter side of its box, in pixels."""
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "face-recognition-models is not installed (pip install avatarforge[preprocess])"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@lru_cache(maxsize=4)
def _detector(kind: str):
    import dlib

    if kind == "hog":
        return dlib.get_frontal_face_detector()
    return dlib.cnn_face_detection_model_v1(str(models_dir() / "mmod_human_face_detector.dat"))


@lru_cache(maxsize=1)
def _predictor():
    import dlib

    return dlib.shape_predictor(str(models_dir() / "shape_predictor_68_face_landmarks.dat"))


# dlib's detectors and shape predictor release the GIL while they run and are not safe to call
# from two threads at once (two training jobs preprocessing in one process segfaulted in
# det.run): one call at a time per process.
_DLIB = threading.Lock()


def _run_detector(pixels: np.ndarray, kind: str, upsample: int) -> list[tuple[Box, float]]:
    det = _detector(kind)
    with _DLIB:
        if kind == "hog":
            rects, scores, _ = det.run(pixels, upsample, 0.0)
            pairs = list(zip(rects, scores, strict=True))
        else:
            pairs = [(d.rect, d.confidence) for d in det(pixels, upsample)]
    return [((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(s)) for r, s in pairs]


def landmarks(pixels: np.ndarray, box: Box) -> np.ndarray:
    """68 (x, y) landmarks of the face in ``box`` (the iBUG 300-W layout)."""
    import dlib

    rect = dlib.rectangle(int(box[0]), int(box[1]), int(box[2]) - 1, int(box[3]) - 1)
    with _DLIB:
        shape = _predictor()(np.ascontiguousarray(pixels), rect)
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


def detect_faces(
    pixels: np.ndarray, *, kind: str = "hog", upsample: int = 1, detect_side: int = 1024
) -> list[Face]:
    """All faces in an RGB uint8 image, largest first, in the image's pixel coordinates."""
    h, w = pixels.shape[:2]
    scale = min(1.0, detect_side / max(h, w))
    small = pixels
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))
    faces = []
    for box, score in _run_detector(np.ascontiguousarray(small), kind, upsample):
        full = tuple(round(v / scale) for v in box)
        faces.append(Face(box=full, score=score))  # type: ignore[arg-type]
    return sorted(faces, key=lambda f: (f.area, f.score), reverse=True)


def largest_face(faces: list[Face]) -> Face | None:
    """The face with the biggest box (ties go to the more confident one)."""
    return max(faces, key=lambda f: (f.area, f.score), default=None)


def with_landmarks(pixels: np.ndarray, face: Face) -> Face:
    return Face(box=face.box, score=face.score, landmarks=landmarks(pixels, face.box))


def cut_off_fraction(face: Face, width: int, height: int) -> float:
    """Share of the landmarks (or of the box area without them) lying outside the photo."""
    if face.landmarks is not None:
        x, y = face.landmarks[:, 0], face.landmarks[:, 1]
        outside = (x < 0) | (y < 0) | (x >= width) | (y >= height)
        return float(outside.mean())
    x0, y0, x1, y1 = face.box
    inside = max(0, min(x1, width) - max(x0, 0)) * max(0, min(y1, height) - max(y0, 0))
    return 1.0 - inside / max(face.area, 1)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
