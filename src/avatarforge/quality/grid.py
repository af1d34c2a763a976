"""grid.png: the generated images with their scores written on them, the references on top.

One row of the user's kept photos, then one row per prompt template: its images with the token
(identity) and without it (leakage), seed by seed. Each image is framed green when it is what
we want (identity: the user; leakage: someone else), red when not, grey without a face, and
carries its distance to the user.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..imaging import contact_sheet
from .metric import IDENTITY, LEAKAGE, ImageScore
from .references import Reference
from .report import EvalReport

CELL = 160
GOOD, BAD, NONE = (30, 160, 60), (210, 40, 40), (150, 150, 150)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _cell(image: Image.Image, colour: tuple[int, int, int], lines: Sequence[str]) -> Image.Image:
    """The image fitted into a square cell, a coloured frame, text on a dark strip below."""
    canvas = Image.new("RGB", (CELL, CELL), (255, 255, 255))
    thumb = image.convert("RGB")
    thumb.thumbnail((CELL, CELL))
    canvas.paste(thumb, ((CELL - thumb.width) // 2, (CELL - thumb.height) // 2))
    draw = ImageDraw.Draw(canvas)
    strip = 15 * len(lines) + 8  # above the frame's bottom edge
    draw.rectangle([0, CELL - strip, CELL, CELL], fill=(20, 20, 20))
    font = _font(12)
    for i, line in enumerate(lines):
        draw.text((7, CELL - strip + 2 + 15 * i), line, fill=colour, font=font)
    draw.rectangle([0, 0, CELL - 1, CELL - 1], outline=colour, width=4)
    return canvas


def score_cell(image: Image.Image, score: ImageScore) -> Image.Image:
    """A generated image with its score written on it."""
    kind = "with token" if score.kind == IDENTITY else "no token (class)"
    if not score.face:
        return _cell(image, NONE, [f"{kind}, seed {score.seed}", "no face"])
    wanted = score.match if score.kind == IDENTITY else not score.match
    verdict = "the user" if score.match else "someone else"
    return _cell(
        image,
        GOOD if wanted else BAD,
        [f"{kind}, seed {score.seed}", f"d {score.distance:.3f}: {verdict}"],
    )


def reference_cell(ref: Reference) -> Image.Image:
    with Image.open(ref.path) as image:
        image.load()
        found = ref.embedding is not None
        label = "reference" if found else "reference, no face"
        return _cell(image, GOOD if found else NONE, [ref.source[:22], label])


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _dist(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_lines(report: EvalReport) -> list[str]:
    s = report.scores
    ident, leak = s["identity"], s["leakage"]
    return [
        f"avatarforge eval {report.user}  (base {report.base_id}, threshold {report.threshold})",
        f"face found {_pct(s['face_found_rate'])} of {s['images']} images;  identity: "
        f"{_pct(ident['match_rate'])} are the user (mean distance {_dist(ident['mean_distance'])});"
        f"  leakage: {_pct(leak['leak_rate'])} of {leak['faces']} class faces are the user",
    ]


def draw_grid(
    report: EvalReport, images: Sequence[Image.Image], references: Sequence[Reference]
) -> Image.Image:
    """The picture grid of a report; ``images`` in the order of ``report.images``. An identity
    prompt and its class prompt (the same words without the token) share a row."""
    rows: dict[str, dict[str, list[Image.Image]]] = {}
    names: dict[str, str] = {}  # row -> its identity prompt, the row's label
    for image, row in zip(images, report.images, strict=True):
        score = ImageScore(**row)
        template = score.prompt.replace(f"{report.token} ", "")
        if score.kind == IDENTITY:
            names.setdefault(template, score.prompt)
        cells = rows.setdefault(template, {IDENTITY: [], LEAKAGE: []})
        cells[score.kind].append(score_cell(image, score))
    grid, labels = [], []
    if references:
        grid.append([reference_cell(r) for r in references])
        labels.append("the user's kept photos (references)")
    for template, cells in rows.items():
        grid.append(cells[IDENTITY] + cells[LEAKAGE])
        labels.append(f"{names.get(template, template)}: then without the token (class prompt)")
    sheet = contact_sheet(grid, labels, cell=CELL)
    return _with_header(sheet, summary_lines(report), report.why)


def _with_header(sheet: Image.Image, lines: list[str], warning: str | None) -> Image.Image:
    font, pad = _font(13), 8
    wrapped = [*lines]
    if warning:
        head, sep, rest = warning.partition(":")
        wrapped += textwrap.wrap(head.upper() + sep + rest, 120)
    height = pad * 2 + 17 * len(wrapped)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(
        sheet.width, *(int(measure.textlength(line, font=font)) + 2 * pad for line in wrapped)
    )
    out = Image.new("RGB", (width, sheet.height + height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(wrapped):
        colour = (0, 0, 0) if i < len(lines) else BAD
        draw.text((pad, pad + 17 * i), line, fill=colour, font=font)
    out.paste(sheet, (0, height))
    return out
