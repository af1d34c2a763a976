"""preprocess_dir: a folder of selfies in, a training folder out (the file I/O edge of the step).

Output layout::

    out_dir/images/<name>.png          crop with its original background (if keep_original)
    out_dir/images/<name>_bg<i>.png    the same person over generated background i
    out_dir/masks/<name>.png           person mask, mode "L", one per kept photo
    out_dir/manifest.json              see :mod:`.manifest` (one kept item per image)
    out_dir/contact_sheet.png          originals beside their results, reasons for rejections
    out_dir/preprocess_config.json     the config that produced it

``in_dir`` is only read (recursively; hidden files and ``out_dir`` itself are skipped). More
than ``max_files`` files is refused before ``out_dir`` is touched. Files are handled in sorted
order, so of two duplicates the first by name is kept. Every failure of one file becomes a
rejected item with its reason; only when fewer than ``min_images`` photos are usable does the
step fail, with :class:`NotEnoughPhotosError`. A failed run publishes no images and writes a
manifest with status "failed" that says why (beside the contact sheet), so training refuses
the folder, even when an earlier run had left a good dataset there.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from .config import NotEnoughPhotosError, PreprocessConfig, PreprocessError
from .duplicates import dhash, find_duplicate
from .intake import Rejected, load_photo
from .manifest import FAILED, KEPT, REJECTED, RUNNING, Manifest, ManifestItem
from .pipeline import process_photo
from .segment import GrabCutSegmenter, Segmenter
from .sheet import SheetRow, SheetRows, render, small, small_crop, thumbnail

log = logging.getLogger(__name__)
# The manifest first: a run stopped while clearing never leaves an old manifest beside new files.
OUTPUTS = (
    "manifest.json",
    "manifest.json.tmp",
    "images",
    "masks",
    "contact_sheet.png",
    "preprocess_config.json",
)


def too_many_files(where: str, max_files: int) -> str:
    return (
        f"{where}: more than {max_files} files (preprocess.max_files, --max-files); a selfie set "
        "is a few dozen photos: is this the right folder?"
    )


def list_photos(
    in_dir: Path, out_dir: Path | None = None, max_files: int | None = None
) -> list[Path]:
    """Every file under ``in_dir`` except hidden ones and anything inside ``out_dir``, sorted.

    Past ``max_files`` files the walk stops with a PreprocessError: a photo library given by
    mistake is neither walked to its end nor decoded.
    """
    skip = out_dir.resolve() if out_dir is not None else None
    found = []
    for path in in_dir.rglob("*"):
        rel = path.relative_to(in_dir)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        found.append(path)
        if max_files is not None and len(found) > max_files:
            raise PreprocessError(too_many_files(str(in_dir), max_files))
    return sorted(found)


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


def _box(box, scale: float = 1.0) -> list[int] | None:
    """A box of the decoded pixels in the source photo's coordinates (the manifest's)."""
    return [round(v * scale) for v in box] if box is not None else None


def preprocess_dir(
    in_dir: Path,
    out_dir: Path,
    config: PreprocessConfig | None = None,
    progress: bool = False,
    segmenter: Segmenter | None = None,
    on_photo: Callable[[int, int, str], None] | None = None,
) -> Manifest:
    """Preprocess every photo in ``in_dir`` into ``out_dir`` (see the module docstring).

    ``progress``: a tqdm bar; ``on_photo(done, total, source)``: told after each photo."""
    config = config or PreprocessConfig()
    segmenter = segmenter or GrabCutSegmenter(config.segment_side, config.grabcut_iterations)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise PreprocessError(f"in_dir {in_dir} is not a folder")
    files = list_photos(in_dir, out_dir, config.max_files)
    _prepare_out(in_dir, out_dir)
    # Written first: the folder is ours to clear on a rerun, and no dataset until the run ends.
    Manifest(items=[], config=config.to_dict(), status=RUNNING).write(out_dir)
    config.save(out_dir / "preprocess_config.json")

    items: list[ManifestItem] = []
    rows = SheetRows(config.sheet_rows)
    hashes: dict[str, int] = {}
    taken: set[str] = set()
    iterator = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="preprocess", unit="photo")
    for done, path in enumerate(iterator, 1):
        rel = path.relative_to(in_dir).as_posix()
        new_items, row = _one(path, rel, out_dir, config, segmenter, hashes, taken)
        items.extend(new_items)
        rows.add(row, rejected=new_items[0].status == REJECTED)
        if on_photo is not None:
            on_photo(done, len(files), rel)

    manifest = Manifest(items=items, config=config.to_dict(), not_on_sheet=rows.omitted)
    error = _shortfall(manifest, config, out_dir)
    if error is not None:
        manifest = _unpublish(manifest, out_dir, error)
    if files:
        render(rows.shown(), _sheet_title(manifest, len(files))).save(out_dir / "contact_sheet.png")
    manifest.write(out_dir)
    if error is not None:
        raise NotEnoughPhotosError(error, manifest)
    return manifest


def _sheet_title(manifest: Manifest, photos: int) -> str:
    usable = len(manifest.kept_sources)
    if manifest.status == FAILED:
        need = manifest.config["min_images"]
        title = f"FAILED: {usable} of {photos} photos usable, min_images is {need}"
    else:
        title = f"{usable} of {photos} photos kept"
    if manifest.not_on_sheet:
        title += f"; {manifest.not_on_sheet} more not shown here (all are in manifest.json)"
    return title


def _unpublish(manifest: Manifest, out_dir: Path, error: str) -> Manifest:
    """The failed form of ``manifest``: no images or masks are left for anything to train on
    (ours or a tool reading images/), and the manifest says why."""
    for name in ("images", "masks"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    return Manifest(
        items=[replace(i, image=None, mask=None) for i in manifest.items],
        config=manifest.config,
        status=FAILED,
        error=error,
        not_on_sheet=manifest.not_on_sheet,
    )


def _one(path, rel, out_dir, config, segmenter, hashes, taken) -> tuple[list, SheetRow]:
    """Process one file; every failure becomes a rejected item (never an exception)."""
    pixels, scale = None, 1.0
    try:
        photo = load_photo(
            path,
            min_side=config.min_side,
            max_pixels=config.max_pixels,
            work_side=config.work_side,
        )
        pixels, scale = photo.pixels, photo.scale
        h = dhash(pixels)
        dup = find_duplicate(h, hashes, config.duplicate_distance)
        hashes[rel] = h
        if dup is not None:
            raise Rejected(
                f"duplicate of {dup[0]} (hash distance {dup[1]})",
                scores={"duplicate_distance": dup[1]},
            )
        done = process_photo(pixels, config, segmenter, key=rel, scale=scale)
    except Rejected as exc:
        log.debug("rejected %s: %s", rel, exc)
        item = ManifestItem(
            source=rel,
            status=REJECTED,
            reason=str(exc),
            face_box=_box(exc.face_box, scale),
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
        face_box=_box(done.face.box, scale),
        crop_box=_box(done.crop_box, scale),
        scores=done.scores,
    )
    items = []
    for kind, stem, img in outputs:
        _save_png(img, out_dir / "images" / f"{stem}.png")
        items.append(ManifestItem(image=f"images/{stem}.png", background=kind, **common))
    padded = done.scores.get("padded", 0.0)
    fill = f", {padded:.0%} padded ({config.pad_mode}; dashed: the photo's edge)" if padded else ""
    row = SheetRow(
        f"{rel}: kept, face {done.scores['face_px']}px, {len(outputs)} image(s){fill}",
        thumbnail(pixels, done.face.box, done.crop_box),
        [
            small_crop(done.image, done.valid),
            small(done.mask),
            *(small(img) for _, img in done.composites),
        ],
    )
    return items, row


def _shortfall(manifest: Manifest, config: PreprocessConfig, out_dir: Path) -> str | None:
    """None when ``min_images`` photos are usable; otherwise why not: each rejection, and the
    settings that would have kept those photos."""
    usable = len(manifest.kept_sources)
    if usable >= config.min_images:
        return None
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
    return (
        f"only {usable} usable photo(s), need at least {config.min_images} "
        f"(preprocess.min_images, --min-images); {len(manifest.rejected)} rejected: {why}.{hint} "
        f"See {out_dir / 'contact_sheet.png'}"
    )
