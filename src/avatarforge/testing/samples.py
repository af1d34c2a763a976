"""Sample photos for tests and the demo, made from a real public-domain portrait; no download.

The only licence-clean real portrait available offline is ``skimage.data.astronaut()`` (Eileen
Collins, NASA, public domain), shipped inside the scikit-image wheel. There is no second real
photo of the same person, so the sample set is variants of that one photo, each a different
photo as far as the pipeline is concerned (mirror, rotations, crops and scales, positions on a
bigger canvas, colour and brightness changes combined with a geometric change, greyscale, an
EXIF-rotated file, WebP and HEIC encodings, a second smaller face pasted in). Everything is
generated deterministically from the pixels, so the same code writes the same files.

:func:`write_hostile` writes what users really upload by mistake, with the reason each must be
rejected for (:data:`HOSTILE`), plus an upside-down EXIF photo that must be turned upright and
kept.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

# Hand-checked on the 512x512 astronaut: cheek to cheek, mid-forehead to chin (x0, y0, x1, y1).
ASTRONAUT_FACE = (180, 78, 270, 172)
ORIENTATION = 0x0112
EXIF_ROTATED = "astronaut_exif_rotated.jpg"  # written beside the variants, stored sideways

# file name -> a phrase the rejection reason must contain (the kept hostile file maps to None).
HOSTILE: dict[str, str | None] = {
    "empty.jpg": "empty file",
    "notes.jpg": "not an image",
    "truncated.jpg": "truncated",
    "huge_header.png": "too large",
    "tiny.png": "too small",
    "no_face.jpg": "no face",
    "small_face.jpg": "face too small",
    "upside_down_exif.jpg": None,
    "upside_down_exif_copy.png": "duplicate of upside_down_exif.jpg",
}


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).convert("RGB")


def _rotate(img: Image.Image, degrees: float, zoom: float = 1.0) -> Image.Image:
    """Rotate about the centre, filling corners by reflection (no black wedges), then zoom."""
    import cv2

    a = np.asarray(img)
    h, w = a.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, zoom)
    return Image.fromarray(cv2.warpAffine(a, m, (w, h), borderMode=cv2.BORDER_REFLECT_101))


def _tint(img: Image.Image, r: float, g: float, b: float) -> Image.Image:
    a = np.asarray(img, dtype=np.float32) * np.array([r, g, b], dtype=np.float32)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _canvas(img: Image.Image, size: tuple[int, int], scale: float, at: tuple[int, int]):
    """The photo, scaled, placed on a bigger softly textured background."""
    rng = np.random.default_rng(7)
    noise = rng.uniform(90, 200, (size[1] // 32 + 1, size[0] // 32 + 1, 3)).astype(np.uint8)
    bg = Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC)
    bg = bg.filter(ImageFilter.GaussianBlur(12))
    small = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    bg.paste(small, at)
    return bg


def _two_faces(img: Image.Image) -> Image.Image:
    """A second, smaller copy of the head pasted over the flag: "largest face" must win."""
    out = img.crop((30, 20, 512, 500))  # also moved, or it would be a duplicate of the original
    head = img.crop((150, 40, 300, 200)).resize((90, 96), Image.LANCZOS)
    out.paste(head, (8, 150))
    return out


def _save_jpeg(img: Image.Image, path: Path, quality: int = 90, orientation: int = 1) -> None:
    exif = Image.Exif()
    if orientation != 1:
        exif[ORIENTATION] = orientation
    img.save(path, "JPEG", quality=quality, exif=exif.tobytes())


def _variants() -> dict[str, Callable[[Image.Image], Image.Image]]:
    return {
        "astronaut.jpg": lambda im: im,
        "astronaut_mirror.jpg": lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
        "astronaut_tilt_left.jpg": lambda im: _rotate(im, 9, 1.05),
        "astronaut_tilt_right.jpg": lambda im: _rotate(im, -7, 1.2),
        "astronaut_warm_close.jpg": lambda im: ImageEnhance.Brightness(
            _tint(im.crop((90, 0, 390, 300)).resize((600, 600), Image.LANCZOS), 1.1, 1.0, 0.85)
        ).enhance(1.1),
        "astronaut_dim_shifted.png": lambda im: ImageEnhance.Contrast(
            ImageEnhance.Brightness(im.crop((0, 0, 400, 440))).enhance(0.7)
        ).enhance(0.8),
        "astronaut_far.jpg": lambda im: _canvas(im, (1024, 768), 0.9, (520, 200)),
        "astronaut_far_left.jpg": lambda im: _canvas(
            im.transpose(Image.FLIP_LEFT_RIGHT), (900, 900), 1.1, (10, 300)
        ),
        "astronaut_grey.png": lambda im: im.crop((0, 60, 452, 512)).convert("L"),
        "astronaut_two_faces.jpg": _two_faces,
        "astronaut_cool.webp": lambda im: _tint(_rotate(im, -3, 1.35), 0.9, 1.0, 1.12),
        "astronaut_crop.heic": lambda im: im.crop((120, 20, 400, 420)),
    }


# Face boxes where the variant's geometry maps the hand-checked box exactly (for IoU tests).
def expected_faces() -> dict[str, tuple[int, int, int, int]]:
    x0, y0, x1, y1 = ASTRONAUT_FACE
    return {
        "astronaut.jpg": ASTRONAUT_FACE,
        "astronaut_mirror.jpg": (512 - x1, y0, 512 - x0, y1),
        EXIF_ROTATED: (x0 - 60, y0, x1 - 60, y1),
        "astronaut_crop.heic": (x0 - 120, y0 - 20, x1 - 120, y1 - 20),
        "astronaut_far.jpg": tuple(
            round(v * 0.9) + o for v, o in zip(ASTRONAUT_FACE, (520, 200, 520, 200), strict=True)
        ),
    }


def write_samples(out_dir: Path) -> list[Path]:
    """Write the good sample photos into ``out_dir``; returns their paths (sorted)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = astronaut()
    variants = _variants()
    for name, make in variants.items():
        img = make(base)
        path = out_dir / name
        if name.endswith(".jpg"):
            _save_jpeg(img, path)
        elif name.endswith(".heic"):
            import pillow_heif

            pillow_heif.register_heif_opener()
            img.save(path, "HEIF", quality=85)
        elif name.endswith(".webp"):
            img.save(path, "WEBP", quality=85, method=4)
        else:
            img.save(path, "PNG")
    # Stored on its side, with the EXIF tag that says "turn 90 degrees clockwise to view".
    sideways = base.crop((60, 0, 512, 460)).transpose(Image.ROTATE_90)
    _save_jpeg(sideways, out_dir / EXIF_ROTATED, orientation=6)
    return sorted(out_dir / name for name in (*variants, EXIF_ROTATED))


def _png_with_header_size(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR claims ``width`` x ``height`` (with a valid CRC)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    # signature (8) | length (4) | b"IHDR" (4) | width (4) | height (4) | ... 13 bytes | CRC (4)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def write_hostile(out_dir: Path) -> dict[str, str | None]:
    """Write the hostile files into ``out_dir``; returns :data:`HOSTILE` (name -> reason)."""
    from skimage import data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = astronaut()
    (out_dir / "empty.jpg").write_bytes(b"")
    (out_dir / "notes.jpg").write_text("my best selfies are on the other phone\n")
    full = io.BytesIO()
    base.save(full, "JPEG", quality=90)
    (out_dir / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) * 2 // 5])
    (out_dir / "huge_header.png").write_bytes(_png_with_header_size(20000, 20000))
    base.resize((48, 48), Image.LANCZOS).save(out_dir / "tiny.png")
    _save_jpeg(Image.fromarray(data.chelsea()).resize((600, 450)), out_dir / "no_face.jpg")
    small = _rotate(base, -4, 1.1).resize((264, 264), Image.LANCZOS)
    _save_jpeg(small, out_dir / "small_face.jpg")
    # Upside down on disk, EXIF orientation 3 ("rotate 180 to view"): must be kept, upright.
    upright = _rotate(base.transpose(Image.FLIP_LEFT_RIGHT), 5, 1.25)
    _save_jpeg(upright.transpose(Image.ROTATE_180), out_dir / "upside_down_exif.jpg", orientation=3)
    # The same photo again, already upright, smaller and re-encoded: a duplicate.
    upright.resize((400, 400), Image.LANCZOS).save(out_dir / "upside_down_exif_copy.png")
    return dict(HOSTILE)


def upside_down_upright() -> np.ndarray:
    """The pixels ``upside_down_exif.jpg`` shows once its EXIF orientation is applied."""
    return np.asarray(_rotate(astronaut().transpose(Image.FLIP_LEFT_RIGHT), 5, 1.25))
