"""Duplicate photos: a 64-bit difference hash of the upright image, compared by Hamming distance.

The hash survives re-encoding, resizing and small colour shifts (the same photo uploaded twice,
or once as HEIC and once as JPEG) but not a flip or a different crop, which are real variety.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def dhash(pixels: np.ndarray, bits: int = 8) -> int:
    """Difference hash: is each pixel brighter than its right neighbour, on a (bits+1)xbits grid."""
    grey = Image.fromarray(pixels).convert("L").resize((bits + 1, bits), Image.Resampling.BOX)
    a = np.asarray(grey, dtype=np.int16)
    diff = (a[:, 1:] > a[:, :-1]).flatten()
    return int("".join("1" if d else "0" for d in diff), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def find_duplicate(h: int, seen: dict[str, int], max_distance: int) -> tuple[str, int] | None:
    """The first earlier photo (name, distance) within ``max_distance`` bits of ``h``, if any."""
    if max_distance < 0:
        return None
    for name, other in seen.items():
        d = hamming(h, other)
        if d <= max_distance:
            return name, d
    return None
