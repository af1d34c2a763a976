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
    in memory, stay bounded however many photos there are). Rejected photos come first, at the
    top, since the sheet is where the user sees why; then the earliest kept ones. Each group
    is in the photos' order."""

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
        return [row for _, row in self._rejected + self._kept]


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


PADDING_LINE = (255, 200, 0)  # where the photo ends in a crop: beyond it is fill, not photo


def small_crop(pixels: np.ndarray, valid: np.ndarray | None, side: int = THUMB) -> Image.Image:
    """A crop's thumbnail with a dashed line where the photo ends (``valid``: the crop's pixels
    that came from the photo), so the sheet shows what was filled in and how it looks."""
    img = small(pixels, side)
    if valid is None or valid.all():
        return img
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    scale = img.width / pixels.shape[1]
    top, bottom = rows[0] * scale, (rows[-1] + 1) * scale - 1
    left, right = cols[0] * scale, (cols[-1] + 1) * scale - 1
    draw = ImageDraw.Draw(img)
    edges = [
        (rows[0] > 0, (left, top, right, top)),
        (rows[-1] < valid.shape[0] - 1, (left, bottom, right, bottom)),
        (cols[0] > 0, (left, top, left, bottom)),
        (cols[-1] < valid.shape[1] - 1, (right, top, right, bottom)),
    ]
    for padded, (x0, y0, x1, y1) in edges:
        if not padded:
            continue
        length = max(x1 - x0, y1 - y0)
        for start in np.arange(0, length, 6):  # dashes: a line the photo does not have
            end = min(start + 3, length)
            if y0 == y1:
                draw.line([(x0 + start, y0), (x0 + end, y0)], fill=PADDING_LINE, width=1)
            else:
                draw.line([(x0, y0 + start), (x0, y0 + end)], fill=PADDING_LINE, width=1)
    return img


def render(rows: list[SheetRow], title: str) -> Image.Image:
    cells = [[row.original, *row.results] for row in rows]
    return contact_sheet(cells, [row.label for row in rows], cell=THUMB, title=title)
