"""preprocess_dir: a folder of selfies in, a training folder out (the file I/O edge of the step).

Output layout::

    out_dir/images/<name>.png          crop with its original background (if keep_original)
    out_dir/images/<name>_bg<i>.png    the same person over generated background i
    out_dir/masks/<name>.png           person mask, mode "L", one per kept photo
    out_dir/manifest.json              see :mod:`.manifest` (one kept item per image)
    out_dir/contact_sheet.png          originals beside their results, reasons for rejections
    out_dir/preprocess_config.json     the config that produced it

``in_dir`` is only read (recursively; hidden files and ``out_dir`` itself are skipped). Files
are handled in sorted order, so of two duplicates the first by name is kept. Every failure of
one file becomes a rejected item with its reason; only when fewer than ``min_images`` photos
are usable does the step fail, with :class:`NotEnoughPhotosError`, after writing everything so
the user can see why.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .config import NotEnoughPhotosError, PreprocessConfig, PreprocessError
from .duplicates import dhash, find_duplicate
from .intake import Rejected, load_photo
from .manifest import KEPT, REJECTED, Manifest, ManifestItem
from .pipeline import process_photo
from .segment import GrabCutSegmenter, Segmenter
from .sheet import SheetRow, render, small, thumbnail

log = logging.getLogger(__name__)
OUTPUTS = ("images", "masks", "manifest.json", "contact_sheet.png", "preprocess_config.json")


def list_photos(in_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Every file under ``in_dir`` except hidden ones and anything inside ``out_dir``."""
    skip = out_dir.resolve() if out_dir is not None else None
    found = []
    for path in sorted(in_dir.rglob("*")):
        rel = path.relative_to(in_dir)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        found.append(path)
    return found


def output_name(rel: str, taken: set[str]) -> str:
    """A file-system-safe, unique stem for the outputs of source ``rel``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(Path(rel).with_suffix("")).replace("/", "__"))
    stem = stem.strip("._") or "photo"
    name, n = stem, 2
    while name.lower() in taken:  # case-insensitive file systems
        name, n = f"{stem}_{n}", n + 1
    taken.add(name.lower())
    return name


def _prepare_out(in_dir: Path, out_dir: Path) -> None:
    src, dst = in_dir.resolve(), out_dir.resolve()
    if src == dst or src.is_relative_to(dst):
        raise PreprocessError(f"out_dir {out_dir} must not be or contain in_dir {in_dir}")
    if dst.exists() and any(dst.iterdir()) and not (dst / "manifest.json").exists():
        raise PreprocessError(
            f"out_dir {out_dir} is not empty and holds no earlier preprocess output; "
            "choose an empty or new folder"
        )
    for name in OUTPUTS:  # only what this step wrote before: never the user's other files
        target = dst / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()


def _save_png(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels).save(path, compress_level=3)


def _box(box) -> list[int] | None:
    return [int(v) for v in box] if box is not None else None


def preprocess_dir(
    in_dir: Path,
    out_dir: Path,
    config: PreprocessConfig | None = None,
    progress: bool = False,
    segmenter: Segmenter | None = None,
) -> Manifest:
    """Preprocess every photo in ``in_dir`` into ``out_dir`` (see the module docstring)."""
    config = config or PreprocessConfig()
    segmenter = segmenter or GrabCutSegmenter(config.segment_side, config.grabcut_iterations)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise PreprocessError(f"in_dir {in_dir} is not a folder")
    _prepare_out(in_dir, out_dir)
    files = list_photos(in_dir, out_dir)

    items: list[ManifestItem] = []
    rows: list[SheetRow] = []
    hashes: dict[str, int] = {}
    taken: set[str] = set()
    iterator = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="preprocess", unit="photo")
    for path in iterator:
        rel = path.relative_to(in_dir).as_posix()
        new_items, row = _one(path, rel, out_dir, config, segmenter, hashes, taken)
        items.extend(new_items)
        rows.append(row)

    manifest = Manifest(items=items, config=config.to_dict())
    config.save(out_dir / "preprocess_config.json")
    if rows:
        title = f"{len(manifest.kept_sources)} of {len(files)} photos kept"
        render(rows, title).save(out_dir / "contact_sheet.png")
    manifest.write(out_dir)
    _check_enough(manifest, config)
    return manifest


def _one(path, rel, out_dir, config, segmenter, hashes, taken) -> tuple[list, SheetRow]:
    """Process one file; every failure becomes a rejected item (never an exception)."""
    pixels = None
    try:
        photo = load_photo(path, min_side=config.min_side, max_pixels=config.max_pixels)
        pixels = photo.pixels
        h = dhash(pixels)
        dup = find_duplicate(h, hashes, config.duplicate_distance)
        hashes[rel] = h
        if dup is not None:
            raise Rejected(
                f"duplicate of {dup[0]} (hash distance {dup[1]})",
                scores={"duplicate_distance": dup[1]},
            )
        done = process_photo(pixels, config, segmenter, key=rel)
    except Rejected as exc:
        log.debug("rejected %s: %s", rel, exc)
        item = ManifestItem(
            source=rel,
            status=REJECTED,
            reason=str(exc),
            face_box=_box(exc.face_box),
            scores=dict(exc.scores),
        )
        thumb = thumbnail(pixels, exc.face_box) if pixels is not None else None
        return [item], SheetRow(f"{rel}: REJECTED - {exc}", thumb)
    except Exception as exc:  # a bug or a decoder crash on one file must not stop the rest
        log.exception("unexpected failure on %s", rel)
        reason = f"could not be processed: {type(exc).__name__}: {exc}"
        return [ManifestItem(source=rel, status=REJECTED, reason=reason)], SheetRow(
            f"{rel}: REJECTED - {reason}"
        )

    name = output_name(rel, taken)
    mask_rel = f"masks/{name}.png"
    _save_png(done.mask, out_dir / mask_rel)
    outputs = [("original", name, done.image)] if config.keep_original else []
    outputs += [(kind, f"{name}_bg{i}", img) for i, (kind, img) in enumerate(done.composites)]
    common = dict(
        source=rel,
        status=KEPT,
        mask=mask_rel,
        face_box=_box(done.face.box),
        crop_box=_box(done.crop_box),
        scores=done.scores,
    )
    items = []
    for kind, stem, img in outputs:
        _save_png(img, out_dir / "images" / f"{stem}.png")
        items.append(ManifestItem(image=f"images/{stem}.png", background=kind, **common))
    row = SheetRow(
        f"{rel}: kept, face {done.face.side}px, {len(outputs)} image(s)",
        thumbnail(pixels, done.face.box, done.crop_box),
        [small(done.image), small(done.mask), *(small(img) for _, img in done.composites)],
    )
    return items, row


def _check_enough(manifest: Manifest, config: PreprocessConfig) -> None:
    """NotEnoughPhotosError unless ``min_images`` photos are usable; its message lists each
    rejection and names the settings that would have kept those photos."""
    usable = len(manifest.kept_sources)
    if usable >= config.min_images:
        return
    why = "; ".join(f"{i.source}: {i.reason}" for i in manifest.rejected) or "no photos found"
    # (start of the reason, the setting that decides it, what to do with it)
    settings = (
        ("duplicate of", "duplicate_distance", "lower: fewer photos count as duplicates; -1: none"),
        ("face too small", "min_face_px", "lower: smaller faces are kept"),
        ("image too small", "min_side", "lower: smaller photos are kept"),
        ("face cut off", "max_cut_off", "higher: faces nearer the edge are kept"),
        ("no face found", "detector", "'cnn' finds more faces, slowly; or raise upsample"),
    )
    hints = []
    for start, field, what in settings:
        count = sum(1 for i in manifest.rejected if (i.reason or "").startswith(start))
        if count:
            flag = "--" + field.replace("_", "-")
            now = getattr(config, field)
            hints.append(f"{start} ({count}): preprocess.{field} ({flag}, now {now!r}; {what})")
    hint = f" Settings that decide this: {'; '.join(hints)}." if hints else ""
    raise NotEnoughPhotosError(
        f"only {usable} usable photo(s), need at least {config.min_images} "
        f"(preprocess.min_images, --min-images); {len(manifest.rejected)} rejected: {why}.{hint} "
        f"See {manifest.dir / 'contact_sheet.png'}",
        manifest,
    )
