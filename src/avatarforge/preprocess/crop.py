"""Crop: a square around the face, padded (never stretched) where it leaves the photo.

The square is centred on the face box, raised by a tenth of the face so hair fits above as
shoulders fit below, and has side ``face * (1 + 2 * margin)``. Where it reaches past the photo
the missing part is filled, then the square is resized to ``size``. :class:`CropTransform` maps
photo coordinates into the output so boxes and landmarks follow the pixels.

The fill is something a model trained on the crops learns too. Repeated edge pixels ("edge")
draw sharp vertical streaks above a face near the top of the photo (hair stretched into a
column); a mirror ("reflect") draws a second, upside-down forehead and eyes. "blur" (the
default) continues the photo's border out of focus: the mirror image, blurred more the farther
it lies from the photo (sharp at the seam, so no line is drawn there), fading into the border's
mean colour — no edges, no texture, nothing with a direction. The composites replace the fill
above the chin with their generated background anyway (:mod:`.pipeline`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .faces import Box

_PAD = {"edge": "edge", "reflect": "symmetric", "constant": "constant", "blur": "symmetric"}
RAISE = 0.1  # the face box is centred on eyes-nose-mouth; the head extends further up
# "blur": (distance from the photo, Gaussian sigma), both as fractions of the output side;
# between two stops the two blurs are mixed. Past FADE_FROM the fill fades into the border's
# mean colour, fully at FADE_TO.
BLUR_STOPS = ((0.0, 0.0), (0.02, 0.01), (0.06, 0.03), (0.15, 0.08))
FADE_FROM, FADE_TO = 0.05, 0.4


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
    pixels: np.ndarray, box: Box, size: int, pad_mode: str = "blur"
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
    if pad_mode == "blur" and not valid.all():
        out = blur_padding(out, valid)  # at the output size: the blurs cost the same per photo
    return out, valid, CropTransform(x0=x0, y0=y0, scale=size / side)


def blur_padding(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``image`` (mirror-padded) with its padding (``~valid``) out of focus: blurred more with
    the distance from the photo (:data:`BLUR_STOPS`), then faded into the mean colour of the
    photo's pixels along the seam. The photo's own pixels are returned unchanged."""
    side = image.shape[0]
    pixels = image.astype(np.float32)
    far = cv2.distanceTransform((~valid).astype(np.uint8), cv2.DIST_L2, 5) / side
    levels = [
        cv2.GaussianBlur(pixels, (0, 0), sigma * side, borderType=cv2.BORDER_REFLECT)
        if sigma else pixels
        for _, sigma in BLUR_STOPS
    ]  # fmt: skip
    fill = levels[-1]  # past the last stop
    for i in range(len(BLUR_STOPS) - 1):
        (near, _), (to, _) = BLUR_STOPS[i], BLUR_STOPS[i + 1]
        t = np.clip((far - near) / (to - near), 0.0, 1.0)[..., None]
        between = ((far >= near) & (far < to))[..., None]
        fill = np.where(between, levels[i] * (1 - t) + levels[i + 1] * t, fill)
    seam = cv2.dilate((~valid).astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2)
    border = pixels[(seam > 0) & valid]
    mean = border.mean(axis=0) if len(border) else pixels[valid].mean(axis=0)
    fade = np.clip((far - FADE_FROM) / (FADE_TO - FADE_FROM), 0.0, 1.0)[..., None]
    fill = fill * (1 - fade) + mean * fade
    out = np.where(valid[..., None], pixels, fill)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
