"""`avatarforge preprocess IN_DIR OUT_DIR` and `avatarforge samples OUT_DIR`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer
from rich.table import Table

from ..preprocess.config import PreprocessConfig
from .common import config_options, console, fail


def _summary(manifest) -> Table:
    usable = len(manifest.kept_sources)
    title = f"preprocess: {usable} photo(s) kept"
    if manifest.status == "failed":  # nothing was published: say so beside the count
        title = f"preprocess failed: {usable} usable photo(s), no images written"
    table = Table(title=title)
    table.add_column("photo")
    table.add_column("status")
    table.add_column("images / reason")
    by_source: dict[str, list] = {}
    for item in manifest.items:
        by_source.setdefault(item.source, []).append(item)
    for source, items in by_source.items():
        first = items[0]
        if first.status == "kept":
            table.add_row(source, "[green]kept[/]", f"{len(items)} image(s), face {first.face_box}")
        else:
            table.add_row(source, "[red]rejected[/]", first.reason or "")
    return table


@config_options(PreprocessConfig, skip=("grabcut_iterations",))
def preprocess(
    in_dir: str = typer.Argument(
        ..., help="folder of the user's photos, or an s3://bucket/prefix/ (only read)"
    ),
    out_dir: Path = typer.Argument(..., help="output folder: images/, masks/, manifest.json"),
    **options,
) -> None:
    """Turn a folder of selfies into a training folder; say why each rejected photo was."""
    config = PreprocessConfig(**options)
    if not in_dir.startswith("s3://"):
        _preprocess(Path(in_dir), out_dir, config)
        return
    with tempfile.TemporaryDirectory(prefix="avatarforge-upload-") as tmp:
        photos = _fetch(in_dir, Path(tmp), config)
        console.print(f"fetched {len(photos)} object(s) from {in_dir}")
        _preprocess(Path(tmp), out_dir, config)


def _fetch(uri: str, dest: Path, config: PreprocessConfig) -> list[Path]:
    """The objects under the S3 prefix ``uri``, downloaded into ``dest`` once their listing
    passed the limits (count: ``max_files``; names that are no file are refused)."""
    from ..storage import ListingLimitError, StorageError, fetch_prefix

    try:
        return fetch_prefix(uri, dest, max_objects=config.max_files)
    except ListingLimitError as exc:
        fail(f"{exc} (limits: preprocess.max_files {config.max_files} objects, --max-files)")
    except (StorageError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:  # the local disk: full, or a name this file system refuses
        fail(f"{uri}: cannot save the photos in {dest}: {exc}")


def _preprocess(in_dir: Path, out_dir: Path, config: PreprocessConfig) -> None:
    from ..preprocess import NotEnoughPhotosError
    from ..preprocess import preprocess_dir as run

    try:
        manifest = run(in_dir, out_dir, config, progress=True)
    except NotEnoughPhotosError as exc:
        console.print(_summary(exc.manifest))
        fail(str(exc))
    console.print(_summary(manifest))
    console.print(f"{len(manifest.kept)} image(s) in {out_dir / 'images'}")
    console.print(f"manifest      {manifest.path}")
    console.print(f"contact sheet {out_dir / 'contact_sheet.png'}")
    if manifest.not_on_sheet:
        console.print(
            f"              ({manifest.not_on_sheet} photo(s) not shown on it, "
            "preprocess.sheet_rows; all are in the manifest)"
        )


def samples(
    out_dir: Path = typer.Argument(..., help="folder to write the sample photos into"),
    hostile: bool = typer.Option(
        False, "--hostile", help="also write the hostile files (broken, empty, no face, ...)"
    ),
) -> None:
    """Write the sample photos (variants of a public-domain portrait) for tests and the demo."""
    from ..testing.samples import write_hostile, write_samples

    paths = write_samples(out_dir)
    console.print(f"{len(paths)} sample photo(s) in {out_dir}")
    if hostile:
        expected = write_hostile(out_dir)
        for name, reason in expected.items():
            console.print(f"  {name}: {'kept (turned upright)' if reason is None else reason}")


def register(app: typer.Typer) -> None:
    """Add this step's commands to the root app."""
    app.command("preprocess")(preprocess)
    app.command("samples")(samples)
