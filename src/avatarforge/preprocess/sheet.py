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


class SheetRows:
    """The rows the contact sheet shows: at most ``limit`` (its height, and the thumbnails held
    in memory, stay bounded however many photos there are), rejected photos first since the
    sheet is where the user sees why, then the earliest kept ones; shown in their own order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.omitted = 0  # photos left off the sheet
        self._rejected: list[tuple[int, SheetRow]] = []
        self._kept: list[tuple[int, SheetRow]] = []
        self._count = 0

    def add(self, row: SheetRow, rejected: bool) -> None:
        (self._rejected if rejected else self._kept).append((self._count, row))
        self._count += 1
        if len(self._rejected) + len(self._kept) > self.limit:
            (self._kept or self._rejected).pop()  # the newest kept row, else the newest row
            self.omitted += 1

    def shown(self) -> list[SheetRow]:
        return [row for _, row in sorted(self._rejected + self._kept, key=lambda pair: pair[0])]


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
