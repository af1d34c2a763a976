"""One photo's path through the step, as a pure function of pixels and config (no file I/O).

decoded pixels -> faces (largest kept, checked) -> square crop -> person mask -> composites.
A photo that cannot be used raises :class:`~.intake.Rejected` with the reason. Boxes are in the
decoded pixels' coordinates; ``scale`` (source pixels per decoded pixel, see
:attr:`~.intake.Photo.scale`) only turns face sizes into the source pixels settings speak of.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from . import backgrounds
from .config import PreprocessConfig
from .crop import crop_square, square_box
from .faces import Box, Face, cut_off_fraction, detect_faces, largest_face, with_landmarks
from .intake import Rejected
from .segment import Segmenter


@dataclass(frozen=True)
class Processed:
    face: Face  # the kept face, in the photo's (oriented) pixel coordinates
    crop_box: Box  # the square cut from the photo, same coordinates (may reach past it)
    image: np.ndarray  # (size, size, 3) uint8 crop with the original background
    mask: np.ndarray  # (size, size) uint8, 255 = person
    composites: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (kind, image)
    scores: dict[str, float] = field(default_factory=dict)
    valid: np.ndarray | None = None  # (size, size) bool: the pixels from the photo, not padding


def sharpness(image: np.ndarray, box: Box) -> float:
    """Variance of the Laplacian over the face: low means blurred (recorded, not judged)."""
    x0, y0, x1, y1 = (max(0, v) for v in box)
    grey = cv2.cvtColor(np.ascontiguousarray(image[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var()) if grey.size else 0.0


def choose_face(
    pixels: np.ndarray, config: PreprocessConfig, scale: float = 1.0
) -> tuple[Face, int]:
    """The largest usable face and how many faces were found, or Rejected with why not."""
    faces = detect_faces(
        pixels, kind=config.detector, upsample=config.upsample, detect_side=config.detect_side
    )
    face = largest_face(faces)
    if face is None:
        raise Rejected("no face found", scores={"faces": 0})
    face = with_landmarks(pixels, face)
    side = round(face.side * scale)  # in source pixels, as min_face_px is
    found = {"faces": len(faces), "detector_score": round(face.score, 4), "face_px": side}
    if side < config.min_face_px:
        raise Rejected(
            f"face too small: {side} px < min_face_px {config.min_face_px}",
            face_box=face.box,
            scores=found,
        )
    cut = cut_off_fraction(face, pixels.shape[1], pixels.shape[0])
    if cut > config.max_cut_off:
        raise Rejected(
            f"face cut off by the photo's edge ({cut:.0%} of landmarks outside)",
            face_box=face.box,
            scores=found,
        )
    return face, len(faces)


def process_photo(
    pixels: np.ndarray, config: PreprocessConfig, segmenter: Segmenter, key: str, scale: float = 1.0
) -> Processed:
    """Crop, segment and composite one decoded photo; ``key`` seeds its backgrounds."""
    face, count = choose_face(pixels, config, scale)
    box = square_box(face.box, config.margin)
    image, valid, tf = crop_square(pixels, box, config.size, config.pad_mode)
    assert face.landmarks is not None
    local = Face(box=tf.box(face.box), score=face.score, landmarks=tf.points(face.landmarks))
    mask = segmenter.mask(image, local)
    # Padding above the chin continues hair or wall (out of focus, see .crop): never the person,
    # so composites replace it. Below the chin it continues the shoulders, left as segmented.
    above_chin = np.arange(config.size)[:, None] < local.box[3]
    mask = np.where(~valid & above_chin, 0, mask).astype(np.uint8)
    composites = [
        (kind, backgrounds.composite(image, mask, bg))
        for kind, bg in backgrounds.variants(config.backgrounds, config.size, config.seed, key)
    ]
    scores = {
        "faces": count,
        "detector_score": round(face.score, 4),
        "face_px": round(face.side * scale),
        "sharpness": round(sharpness(image, local.box), 2),
        "brightness": round(float(image.mean()) / 255.0, 4),
        "mask_coverage": round(float(mask.mean()) / 255.0, 4),
        "padded": round(1.0 - float(valid.mean()), 4),
    }
    return Processed(face, box, image, mask, composites, scores, valid)
