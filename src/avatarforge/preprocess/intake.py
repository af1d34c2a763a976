"""Intake: decode what users upload into an upright RGB array, or say why it is not a photo.

Reads JPEG, PNG, WebP, HEIC/HEIF (through pillow-heif), applies the EXIF orientation, and
normalises every colour mode (palette, greyscale, 16-bit, CMYK, alpha) to 8-bit RGB. The size is
checked from the header before any pixel is decoded, so a 20000x20000 "PNG" costs nothing.
Files are only ever opened for reading.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # HEIC/HEIF is what iPhones upload; optional so the rest works without the wheel
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - pillow-heif is in the preprocess extra
    pillow_heif = None

FORMATS = ("JPEG", "PNG", "WEBP", "HEIF", "MPO")  # MPO: multi-picture JPEGs from some phones


class Rejected(Exception):
    """This file cannot be used; ``str(exc)`` is the reason shown to the user.

    Later steps (faces) attach what they found so the manifest can show it.
    """

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

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent areas become white (what a viewer would show)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of letting convert() clip at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = max(float(arr.max()), 1.0)
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


def load_photo(path: Path, *, min_side: int, max_pixels: int) -> Photo:
    """Decode ``path`` or raise :class:`Rejected` with a specific, human-readable reason."""
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
            return _decode(img, min_side=min_side, max_pixels=max_pixels)


def _decode(img: Image.Image, *, min_side: int, max_pixels: int) -> Photo:
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
    try:
        img.load()
        orientation = int(img.getexif().get(0x0112, 1) or 1)
        upright = ImageOps.exif_transpose(img)
        rgb = to_rgb(upright)
        pixels = np.array(rgb, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise Rejected(_bomb_reason(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Rejected(f"corrupt or truncated image: {exc}") from exc
    return Photo(pixels=pixels, format=fmt, orientation=orientation if 1 <= orientation <= 8 else 1)
