"""Crop: a square around the face, padded (never stretched) where it leaves the photo.

The square is centred on the face box, raised by a tenth of the face so hair fits above as
shoulders fit below, and has side ``face * (1 + 2 * margin)``. Where it reaches past the photo
the missing part is filled (edge pixels, a mirror image or black), then the square is resized to
``size``. :class:`CropTransform` maps photo coordinates into the output so boxes and landmarks
follow the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .faces import Box

_PAD = {"edge": "edge", "reflect": "symmetric", "constant": "constant"}
RAISE = 0.1  # the face box is centred on eyes-nose-mouth; the head extends further up


@dataclass(frozen=True)
class CropTransform:
    """Output = (photo - (x0, y0)) * scale."""

    x0: int
    y0: int
    scale: float

    def points(self, xy: np.ndarray) -> np.ndarray:
        return (np.asarray(xy, dtype=np.float32) - (self.x0, self.y0)) * self.scale

    def box(self, box: Box) -> Box:
        (a, b), (c, d) = self.points(np.array([box[:2], box[2:]]))
        return (round(a), round(b), round(c), round(d))


def square_box(face: Box, margin: float) -> Box:
    """The square crop (x0, y0, x1, y1) around a face box; may extend past the photo."""
    fx0, fy0, fx1, fy1 = face
    side = max(fx1 - fx0, fy1 - fy0)
    crop = max(1, round(side * (1 + 2 * margin)))
    cx = (fx0 + fx1) / 2
    cy = (fy0 + fy1) / 2 - RAISE * side
    x0, y0 = round(cx - crop / 2), round(cy - crop / 2)
    return (x0, y0, x0 + crop, y0 + crop)


def crop_square(
    pixels: np.ndarray, box: Box, size: int, pad_mode: str = "edge"
) -> tuple[np.ndarray, np.ndarray, CropTransform]:
    """Cut ``box`` out of ``pixels``, pad what lies outside, resize to ``size`` x ``size``.

    Returns the image, a bool mask of the output pixels that came from the photo (False where
    padded), and the transform from photo to output coordinates.
    """
    h, w = pixels.shape[:2]
    x0, y0, x1, y1 = box
    left, top = max(0, -x0), max(0, -y0)
    right, bottom = max(0, x1 - w), max(0, y1 - h)
    inner = pixels[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
    pad = ((top, bottom), (left, right), (0, 0))
    if pad_mode == "reflect" and min(inner.shape[:2]) < max(top, bottom, left, right):
        pad_mode = "edge"  # a mirror needs as many pixels as it fills; fall back quietly
    square = np.pad(inner, pad, mode=_PAD[pad_mode])
    valid = np.zeros(square.shape[:2], dtype=np.uint8)
    valid[top : top + inner.shape[0], left : left + inner.shape[1]] = 1
    side = square.shape[0]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    out = cv2.resize(square, (size, size), interpolation=interp)
    valid = cv2.resize(valid, (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
    return out, valid, CropTransform(x0=x0, y0=y0, scale=size / side)
