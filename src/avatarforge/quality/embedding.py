"""The 128-d dlib face embedding: one vector per face, near for one person, far for two.

dlib's ResNet (``dlib_face_recognition_resnet_model_v1.dat``, shipped in the
face-recognition-models wheel: nothing is downloaded) maps an aligned face to 128 numbers; two
photos of one person lie within a Euclidean distance of 0.6 of each other, photos of two people
beyond it (dlib's LFW figure, 99.38%). The face is found and aligned with the same detector and
68-point landmarks as preprocessing, behind the same lock (dlib objects are not thread-safe).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from ..errors import AvatarforgeError
from ..preprocess.faces import _DLIB, Box, _predictor, detect_faces, largest_face, models_dir

MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
MODEL_NAME = "dlib_face_recognition_resnet_model_v1 (128-d)"
THRESHOLD = 0.6  # dlib's: below it, the same person


class EmbeddingError(AvatarforgeError):
    """The face embedding model cannot be found or loaded."""


@dataclass(frozen=True)
class FaceEmbedding:
    """The embedding of the largest face in an image, and where that face is."""

    vector: np.ndarray  # (128,) float64
    box: Box


@lru_cache(maxsize=1)
def _model():
    import dlib

    path = models_dir() / MODEL_FILE
    if not path.is_file():
        raise EmbeddingError(
            f"{MODEL_FILE} is missing from the face-recognition-models wheel ({path}); "
            "reinstall it: make setup"
        )
    return dlib.face_recognition_model_v1(str(path))


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def embed_face(
    image: Image.Image | np.ndarray, *, upsample: int = 1, detect_side: int = 1024
) -> FaceEmbedding | None:
    """The embedding of the largest face in ``image`` (HOG detector); None when it has none."""
    import dlib

    pixels = _rgb(image)
    face = largest_face(detect_faces(pixels, upsample=upsample, detect_side=detect_side))
    if face is None:
        return None
    x0, y0, x1, y1 = face.box
    rect = dlib.rectangle(int(x0), int(y0), int(x1) - 1, int(y1) - 1)
    model = _model()
    with _DLIB:
        shape = _predictor()(pixels, rect)
        vector = np.array(model.compute_face_descriptor(pixels, shape), dtype=np.float64)
    return FaceEmbedding(vector=vector, box=face.box)


def distance(a: np.ndarray | FaceEmbedding, b: np.ndarray | FaceEmbedding) -> float:
    """Euclidean distance of two embeddings (same person: below :data:`THRESHOLD`)."""
    va = a.vector if isinstance(a, FaceEmbedding) else np.asarray(a)
    vb = b.vector if isinstance(b, FaceEmbedding) else np.asarray(b)
    return float(np.linalg.norm(va - vb))
