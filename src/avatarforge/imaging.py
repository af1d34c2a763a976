"""Small image helpers shared by every step: contact sheets people look at instead of logs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

Cell = Image.Image | Path | None


def _as_image(cell: Cell, size: int) -> Image.Image:
    if cell is None:
        return Image.new("RGB", (size, size), (235, 235, 235))
    if isinstance(cell, Image.Image):
        img = cell.convert("RGB")
    else:
        with Image.open(cell) as opened:
            img = opened.convert("RGB")
    img.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def contact_sheet(
    rows: Sequence[Sequence[Cell]],
    labels: Sequence[str] | None = None,
    *,
    cell: int = 160,
    title: str | None = None,
) -> Image.Image:
    """A grid of thumbnails, one row per item, with an optional caption under each row.

    ``None`` cells are drawn as grey placeholders (e.g. a rejected photo has no result).
    """
    if not rows:
        raise ValueError("contact_sheet: no rows to draw")
    font = ImageFont.load_default()
    cols = max(len(r) for r in rows)
    pad, caption = 6, 14 if labels else 0
    head = 20 if title else 0
    width = cols * (cell + pad) + pad
    height = head + len(rows) * (cell + caption + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 4), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        y = head + pad + r * (cell + caption + pad)
        for c, item in enumerate(row):
            sheet.paste(_as_image(item, cell), (pad + c * (cell + pad), y))
        if labels:
            draw.text((pad, y + cell + 1), labels[r][: width // 6], fill=(40, 40, 40), font=font)
    return sheet
