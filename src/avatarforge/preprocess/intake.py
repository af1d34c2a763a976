"""Intake: decode what users upload into an upright RGB array, or say why it is not a photo.

Reads JPEG, PNG, WebP, HEIC/HEIF (through pillow-heif), applies the EXIF orientation, and
normalises every colour mode (palette, greyscale, 16-bit, CMYK, alpha) to 8-bit RGB. The size is
checked from the header before any pixel is decoded, so a 20000x20000 "PNG" costs nothing.
Files are only ever opened for reading.

Memory: a photo larger than ``work_side`` is reduced by a whole factor as it is decoded (a JPEG
at 1/2 to 1/8 scale by libjpeg itself), and colour modes are converted strip by strip, so
the only full-size buffer is the decoder's own (4 bytes a pixel for a PNG: 400 MB at 100 MP).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import AvatarforgeError

try:  # HEIC/HEIF is what iPhones upload; optional so the rest works without the wheel
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - pillow-heif is in the preprocess extra
    pillow_heif = None

FORMATS = ("JPEG", "PNG", "WEBP", "HEIF", "MPO")  # MPO: multi-picture JPEGs from some phones
DRAFTS = ("JPEG", "MPO")  # formats whose decoder can reduce the size itself (Image.draft)
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")
STRIP = 64  # rows converted at a time: a colour-mode change copies a strip, never the photo
# EXIF orientation -> the view of the stored pixels that is upright (as ImageOps.exif_transpose)
UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


class Rejected(AvatarforgeError):
    """This file cannot be used; ``str(exc)`` is the reason shown to the user.

    Later steps (faces) attach what they found so the manifest can show it.
    """

    status = 400

    def __init__(self, reason: str, *, face_box=None, scores: dict | None = None) -> None:
        super().__init__(reason)
        self.face_box = face_box
        self.scores = scores or {}


@dataclass(frozen=True)
class Photo:
    """A decoded photo: upright RGB pixels plus what intake learned about the file."""

    pixels: np.ndarray  # (H, W, 3) uint8, in the oriented (as displayed) frame
    format: str
    orientation: int  # EXIF orientation tag that was applied (1 = none)
    scale: float = 1.0  # source pixels per decoded pixel (> 1 when reduced to work_side)

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def to_rgb(img: Image.Image, top: float | None = None) -> Image.Image:
    """Any PIL mode -> RGB; transparent areas become white (what a viewer would show).

    ``top``: the brightest value of the whole 16-bit photo when ``img`` is a strip of it.
    """
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT:
        # 16-bit greyscale: scale to 8 bits instead of letting convert() clip at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = max(float(arr.max()), 1.0) if top is None else top
        img = Image.fromarray((arr * (255.0 / (65535.0 if top > 255 else 255.0))).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _bomb_reason(exc: Exception) -> str:
    # PIL refuses before we see the size; its message carries the pixel count it read.
    found = re.search(r"\((\d+) pixels\)", str(exc))
    claimed = f"{int(found.group(1)) / 1e6:.1f} MP" if found else "more pixels than allowed"
    return f"image too large: header claims {claimed} (decompression-bomb guard)"


def reduction(size: tuple[int, int], work_side: int | None) -> int:
    """The smallest whole factor that brings the longer side to ``work_side`` or below."""
    if work_side is None or max(size) <= work_side:
        return 1
    return math.ceil(max(size) / work_side)


def to_array(img: Image.Image, work_side: int | None = None) -> np.ndarray:
    """A loaded image as (H, W, 3) uint8 RGB, reduced by :func:`reduction`, strip by strip.

    Strips are a multiple of the factor high, so box-reducing them one by one gives the same
    pixels as reducing the whole image.
    """
    w, h = img.size
    k = reduction(img.size, work_side)
    top = max(float(img.getextrema()[1]), 1.0) if img.mode in SIXTEEN_BIT else None
    out = np.empty((math.ceil(h / k), math.ceil(w / k), 3), np.uint8)
    rows = STRIP * k
    for y in range(0, h, rows):
        strip = to_rgb(img.crop((0, y, w, min(h, y + rows))), top)
        if k > 1:
            strip = strip.reduce(k)
        out[y // k : y // k + strip.height] = np.asarray(strip)
    return out


def load_photo(
    path: Path, *, min_side: int, max_pixels: int, work_side: int | None = None
) -> Photo:
    """Decode ``path`` or raise :class:`Rejected` with a specific, human-readable reason.

    ``work_side``: reduce a photo whose longer side is above it (None: full size).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise Rejected(f"cannot read file: {exc.strerror or exc}") from exc
    if size == 0:
        raise Rejected("empty file (0 bytes)")
    with warnings.catch_warnings():
        # We enforce our own max_pixels below; PIL's warning between its two limits is noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise Rejected(_bomb_reason(exc)) from exc
        except UnidentifiedImageError as exc:
            raise Rejected("not an image (unrecognised file format)") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise Rejected(f"corrupt image header: {exc}") from exc
        with img:
            return _decode(img, min_side=min_side, max_pixels=max_pixels, work_side=work_side)


def _decode(img: Image.Image, *, min_side: int, max_pixels: int, work_side: int | None) -> Photo:
    fmt = img.format or "unknown"
    if fmt not in FORMATS:
        raise Rejected(f"unsupported format {fmt} (use JPEG, PNG, WebP or HEIC)")
    w, h = img.size
    if w * h > max_pixels:
        raise Rejected(
            f"image too large: {w}x{h} = {w * h / 1e6:.1f} MP > max_pixels "
            f"{max_pixels / 1e6:.1f} MP"
        )
    if min(w, h) < min_side:
        raise Rejected(f"image too small: {w}x{h}, shorter side < min_side {min_side}")
    k = reduction((w, h), work_side)
    if k > 1 and fmt in DRAFTS:  # libjpeg decodes at 1/2, 1/4 or 1/8 scale: never full size
        img.draft(img.mode, (math.ceil(w / k), math.ceil(h / k)))
    try:
        img.load()
        orientation = int(img.getexif().get(0x0112, 1) or 1)
        pixels = to_array(img, work_side)
    except Image.DecompressionBombError as exc:
        raise Rejected(_bomb_reason(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Rejected(f"corrupt or truncated image: {exc}") from exc
    img.close()  # free the decoder's full-size buffer before the upright copy is made
    scale = w / pixels.shape[1]
    orientation = orientation if 1 <= orientation <= 8 else 1
    if orientation != 1:
        pixels = np.ascontiguousarray(UPRIGHT[orientation](pixels))
    return Photo(pixels=pixels, format=fmt, orientation=orientation, scale=scale)
