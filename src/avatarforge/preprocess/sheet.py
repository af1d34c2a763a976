"""The contact sheet: each photo's original (face box drawn) beside its crop, mask, composites."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..imaging import contact_sheet

THUMB = 160


@dataclass
class SheetRow:
    label: str
    original: Image.Image | None = None  # thumbnail, face box already drawn
    results: list[Image.Image] = field(default_factory=list)


def thumbnail(pixels: np.ndarray, box=None, crop=None, side: int = THUMB) -> Image.Image:
    """A small copy of the photo with the face box (red) and the crop square (green) drawn."""
    img = Image.fromarray(pixels)
    scale = min(1.0, side / max(img.size))
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    draw = ImageDraw.Draw(img)
    for rect, colour in ((crop, (40, 200, 40)), (box, (230, 30, 30))):
        if rect is not None:
            draw.rectangle([round(v * scale) for v in rect], outline=colour, width=2)
    return img


def small(pixels: np.ndarray, side: int = THUMB) -> Image.Image:
    img = Image.fromarray(pixels)
    img.thumbnail((side, side))
    return img


def render(rows: list[SheetRow], title: str) -> Image.Image:
    cells = [[row.original, *row.results] for row in rows]
    return contact_sheet(cells, [row.label for row in rows], cell=THUMB, title=title)
