"""A user's gallery: the avatars of a style pack as a contact sheet and one self-contained page.

``write_gallery`` fills one folder, replaced whole::

    index.html         every avatar with its prompt, negative prompt and gen_args; the images
                       are inside the page (data: URIs): one file to open, mail or upload
    contact_sheet.png  one row per style, one column per framing
    gallery.json       what the page shows, for programs
    NN-style-framing.jpg  each avatar exactly as the server sent it

Every text on the page is HTML-escaped, and the page forbids scripts and anything from outside
itself (Content-Security-Policy): a pack's prompt is text, never markup.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from . import __version__
from .imaging import contact_sheet

HTML_FILE = "index.html"
SHEET_FILE = "contact_sheet.png"
JSON_FILE = "gallery.json"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'none'"


@dataclass(frozen=True)
class GalleryImage:
    file: str  # its file name in the gallery folder
    jpeg: bytes
    title: str  # e.g. "oil-painting x headshot"
    row: str  # the contact sheet's row (the style)
    column: str  # and column (the framing)
    prompt: str
    negative_prompt: str = ""
    gen_args: dict[str, Any] = field(default_factory=dict)

    def size(self) -> tuple[int, int]:
        with Image.open(io.BytesIO(self.jpeg)) as image:
            return image.size


@dataclass(frozen=True)
class GalleryFiles:
    folder: Path
    html: Path
    sheet: Path
    index: Path
    images: list[Path]


def gallery_images(rendered: Sequence[Any]) -> list[GalleryImage]:
    """The images of rendered pack items (:class:`avatarforge.packs.Rendered`), in order; an
    item with several images gives ``NN-style-framing-K.jpg`` files."""
    out = []
    for r in rendered:
        item = r.item
        for k, jpeg in enumerate(r.jpegs):
            suffix = f"-{k}" if len(r.jpegs) > 1 else ""
            out.append(
                GalleryImage(
                    file=f"{item.stem}{suffix}.jpg",
                    jpeg=jpeg,
                    title=item.label + (f" ({k + 1})" if suffix else ""),
                    row=item.style,
                    column=item.framing,
                    prompt=item.prompt,
                    negative_prompt=item.negative_prompt,
                    gen_args=item.gen_args,
                )
            )
    return out


def draw_sheet(images: Sequence[GalleryImage], title: str, cell: int = 192) -> Image.Image:
    """One row per style (``row``), its framings left to right, the prompt under the row."""
    rows: dict[str, list[GalleryImage]] = {}
    for image in images:
        rows.setdefault(image.row, []).append(image)
    cells = [[Image.open(io.BytesIO(i.jpeg)) for i in row] for row in rows.values()]
    labels = [f"{name}: {row[0].prompt}" for name, row in rows.items()]
    return contact_sheet(cells, labels, cell=cell, title=title)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; background: #fafafa; color: #222; }
h1 { font-size: 1.5rem; margin: 0 0 .5rem; }
dl.details { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }
dl.details dt { font-weight: 600; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr));
  gap: 1.2rem; margin-top: 1.5rem; }
figure { margin: 0; background: #fff; border-radius: 8px; padding: .6rem;
  box-shadow: 0 1px 3px rgba(0,0,0,.15); }
figure img { width: 100%; height: auto; border-radius: 4px; display: block; }
figcaption h2 { font-size: 1rem; margin: .5rem 0 .3rem; }
figcaption p { margin: .2rem 0; font-size: .85rem; }
.negative { color: #777; }
code { font-size: .75rem; word-break: break-all; }
"""


def render_html(images: Sequence[GalleryImage], title: str, details: dict[str, str]) -> str:
    """The gallery page: no scripts, nothing loaded from outside it, every text escaped."""
    e = html.escape
    rows = "\n".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in details.items())
    figures = []
    for image in images:
        width, height = image.size()
        data = base64.b64encode(image.jpeg).decode("ascii")
        negative = (
            f'<p class="negative">negative: {e(image.negative_prompt)}</p>'
            if image.negative_prompt
            else ""
        )
        args = e(json.dumps(image.gen_args, sort_keys=True))
        figures.append(
            f'<figure data-file="{e(image.file)}">\n'
            f'<img src="data:image/jpeg;base64,{data}" width="{width}" height="{height}" '
            f'alt="{e(image.title)}: {e(image.prompt)}">\n'
            f"<figcaption><h2>{e(image.title)}</h2>\n"
            f'<p class="prompt">{e(image.prompt)}</p>\n{negative}\n'
            f'<p><code class="gen-args">{args}</code></p></figcaption>\n</figure>'
        )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f'<h1>{e(title)}</h1>\n<dl class="details">\n{rows}\n</dl>\n'
        f'<main class="gallery">\n{chr(10).join(figures)}\n</main>\n'
        f"<footer><p>made with avatarforge {e(__version__)}</p></footer>\n"
        "</body>\n</html>\n"
    )


def write_gallery(
    out_dir: Path, images: Sequence[GalleryImage], *, title: str, details: dict[str, str]
) -> GalleryFiles:
    """Write the gallery folder (replacing an earlier one whole); returns its files."""
    from .fsutil import replace_dir

    if not images:
        raise ValueError("write_gallery: no images")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would keep it from everyone else
        for image in images:
            (tmp / image.file).write_bytes(image.jpeg)
        (tmp / HTML_FILE).write_text(render_html(images, title, details), encoding="utf-8")
        draw_sheet(images, title).save(tmp / SHEET_FILE)
        index = {
            "title": title,
            "details": details,
            "images": [
                {k: v for k, v in asdict(i).items() if k != "jpeg"} | {"size": list(i.size())}
                for i in images
            ],
        }
        (tmp / JSON_FILE).write_text(json.dumps(index, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return GalleryFiles(
        folder=out_dir,
        html=out_dir / HTML_FILE,
        sheet=out_dir / SHEET_FILE,
        index=out_dir / JSON_FILE,
        images=[out_dir / i.file for i in images],
    )
