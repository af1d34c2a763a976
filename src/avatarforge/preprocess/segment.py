"""Segmentation: which pixels of a face crop are the person (face, hair, shoulders).

:class:`Segmenter` is the interface a learned model can plug into later: ``mask(image, face)``
returns an (H, W) uint8 mask, 255 = person. The default, :class:`GrabCutSegmenter`, is classical:
the landmark hull (raised to the hairline) is sure foreground, a head ellipse and a torso
trapezoid below the chin are probably foreground, the top corners far from the head are sure
background, and OpenCV's GrabCut decides the rest from colour models. GrabCut runs at
``work_side`` pixels (cost grows with area); the mask is scaled back up and feathered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from .faces import Face


@runtime_checkable
class Segmenter(Protocol):
    def mask(self, image: np.ndarray, face: Face) -> np.ndarray:
        """(H, W) uint8 person mask of an RGB image, given its face in the same coordinates."""
        ...


def _face_hull(face: Face, scale: float) -> np.ndarray:
    """Polygon of surely-face pixels: landmark hull raised to the forehead, or the box ellipse."""
    x0, y0, x1, y1 = (v * scale for v in face.box)
    if face.landmarks is None:
        c = ((x0 + x1) / 2, (y0 + y1) / 2)
        pts = cv2.ellipse2Poly(
            (round(c[0]), round(c[1])),
            (round((x1 - x0) * 0.4), round((y1 - y0) * 0.45)),
            0,
            0,
            360,
            10,
        )
        return pts.astype(np.int32)
    pts = face.landmarks * scale
    brows = pts[17:27].copy()
    brows[:, 1] -= 0.2 * (y1 - y0)  # the forehead has no landmarks; it is skin up to the hair
    hull = cv2.convexHull(np.concatenate([pts, brows]).astype(np.float32))
    return np.round(hull).astype(np.int32)


def _fill_ellipse(canvas: np.ndarray, centre: tuple[int, int], axes: tuple[int, int]) -> None:
    cv2.ellipse(canvas, centre, axes, 0, 0, 360, 1, thickness=-1)


def seed_mask(shape: tuple[int, int], face: Face, scale: float = 1.0) -> np.ndarray:
    """GrabCut's starting labels (GC_BGD, GC_PR_BGD, GC_PR_FGD, GC_FGD) for a head crop."""
    h, w = shape
    x0, y0, x1, y1 = (v * scale for v in face.box)
    fw, fh = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    seed = np.full((h, w), cv2.GC_PR_BGD, np.uint8)

    # Sure background: the upper corners well outside a generous head ellipse (room for hair).
    far = np.zeros((h, w), np.uint8)
    _fill_ellipse(far, (round(cx), round(cy - 0.15 * fh)), (round(1.25 * fw), round(1.25 * fh)))
    upper = np.zeros((h, w), bool)
    upper[: max(0, min(h, round(y1)))] = True
    seed[upper & (far == 0)] = cv2.GC_BGD

    # Probably person: the head (hair included) and a torso widening from the chin down.
    head = np.zeros((h, w), np.uint8)
    _fill_ellipse(head, (round(cx), round(cy - 0.1 * fh)), (round(0.75 * fw), round(0.85 * fh)))
    torso = np.array(
        [
            (cx - 0.45 * fw, y1),
            (cx + 0.45 * fw, y1),
            (cx + 1.6 * fw, y1 + 1.2 * fh),
            (cx + 1.6 * fw, h),
            (cx - 1.6 * fw, h),
            (cx - 1.6 * fw, y1 + 1.2 * fh),
        ],
        dtype=np.float32,
    )
    cv2.fillPoly(head, [np.round(torso).astype(np.int32)], 1)
    seed[head == 1] = cv2.GC_PR_FGD

    cv2.fillPoly(seed, [_face_hull(face, scale)], int(cv2.GC_FGD))
    return seed


def _keep_person(fg: np.ndarray, core: np.ndarray) -> np.ndarray:
    """Keep the connected parts touching the face and fill their holes (eyes, glasses, teeth)."""
    _, labels = cv2.connectedComponents(fg.astype(np.uint8), connectivity=8)
    keep = np.unique(labels[(core > 0) & (labels > 0)])
    person = np.isin(labels, keep).astype(np.uint8)
    contours, _ = cv2.findContours(person, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(person)
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    return filled


@dataclass(frozen=True)
class GrabCutSegmenter:
    """Landmark-seeded GrabCut (see the module docstring)."""

    work_side: int = 256
    iterations: int = 5

    def mask(self, image: np.ndarray, face: Face) -> np.ndarray:
        h, w = image.shape[:2]
        scale = min(1.0, self.work_side / max(h, w))
        small = cv2.resize(
            image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA
        )
        seed = seed_mask(small.shape[:2], face, scale)
        core = (seed == cv2.GC_FGD).astype(np.uint8)
        labels = seed.copy()
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        try:
            bgr = np.ascontiguousarray(small[:, :, ::-1])  # OpenCV's colour order
            # GrabCut seeds its colour models with k-means on OpenCV's per-thread RNG, whose
            # state carries over from call to call: reset it, so the same photo gives the same
            # mask in any process and at any point (a resumed training job checks the dataset
            # hash, which covers the masks' scores).
            cv2.setRNGSeed(0)
            cv2.grabCut(bgr, labels, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
        except cv2.error:
            # A flat image (one colour) gives GrabCut no model to fit; fall back to the seed.
            labels = seed
        fg = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD))
        person = _keep_person(fg, core).astype(np.float32)
        full = cv2.resize(person, (w, h), interpolation=cv2.INTER_LINEAR)
        sigma = max(0.5, 1.0 / scale)  # feather about one work pixel: no hard stair steps
        soft = cv2.GaussianBlur(full, (0, 0), sigma)
        hull = np.zeros((h, w), np.uint8)
        cv2.fillPoly(hull, [_face_hull(face, 1.0)], 1)
        soft = np.maximum(soft, hull.astype(np.float32))
        return np.clip(np.round(soft * 255), 0, 255).astype(np.uint8)
