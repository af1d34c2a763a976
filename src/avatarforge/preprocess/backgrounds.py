"""New backgrounds behind the person, so the model learns the face and not the wall behind it.

Three kinds, drawn from a seeded generator: a solid colour, a two-colour linear gradient at a
random angle, and blurred colour noise (a soft out-of-focus look). Pure functions of
(size, rng); :func:`composite` alpha-blends with the soft person mask.
"""

from __future__ import annotations

import cv2
import numpy as np

KINDS = ("solid", "gradient", "noise")


def _colour(rng: np.random.Generator) -> np.ndarray:
    # Muted-to-bright colours in HSV so no background is a near copy of another.
    hsv = np.array([[[rng.integers(0, 180), rng.integers(40, 200), rng.integers(90, 240)]]])
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def solid(size: int, rng: np.random.Generator) -> np.ndarray:
    return np.broadcast_to(_colour(rng), (size, size, 3)).astype(np.uint8)


def gradient(size: int, rng: np.random.Generator) -> np.ndarray:
    a, b = _colour(rng), _colour(rng)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return (a * (1 - t[..., None]) + b * t[..., None]).round().astype(np.uint8)


def noise(size: int, rng: np.random.Generator) -> np.ndarray:
    cells = int(rng.integers(4, 16))
    coarse = rng.uniform(0, 1, (cells, cells, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    smooth = cv2.GaussianBlur(smooth, (0, 0), size / cells / 2)
    base, tint = _colour(rng), _colour(rng)
    img = base * (1 - smooth) + tint * smooth
    return np.clip(img, 0, 255).round().astype(np.uint8)


_MAKERS = {"solid": solid, "gradient": gradient, "noise": noise}


def make_background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) uint8 background of ``kind`` (one of :data:`KINDS`)."""
    return _MAKERS[kind](size, rng)


def variants(count: int, size: int, seed: int, key: str) -> list[tuple[str, np.ndarray]]:
    """``count`` (kind, background) pairs; the same (seed, key) always gives the same images.

    ``key`` (the source file name) varies the draw per photo while keeping runs reproducible.
    Kinds cycle so a photo with 3 variants gets one of each.
    """
    digest = np.frombuffer(key.encode("utf-8"), dtype=np.uint8)
    rng = np.random.default_rng([seed, *digest.tolist()])
    start = int(rng.integers(0, len(KINDS)))
    out = []
    for i in range(count):
        kind = KINDS[(start + i) % len(KINDS)]
        out.append((kind, make_background(kind, size, rng)))
    return out


def composite(image: np.ndarray, mask: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Person from ``image`` over ``background``, blended by the 0..255 ``mask``."""
    alpha = (mask.astype(np.float32) / 255.0)[..., None]
    out = image.astype(np.float32) * alpha + background.astype(np.float32) * (1 - alpha)
    return np.clip(out, 0, 255).round().astype(np.uint8)
