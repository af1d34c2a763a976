"""`avatarforge preprocess IN_DIR OUT_DIR` and `avatarforge samples OUT_DIR`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..settings import ConfigError

console = Console()

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
# Options are generated from PreprocessConfig (one place for defaults, help and bounds).
_SKIP = ("grabcut_iterations",)


def _options() -> list[tuple[str, dataclasses.Field]]:
    from ..preprocess.config import PreprocessConfig

    return [(f.name, f) for f in dataclasses.fields(PreprocessConfig) if f.name not in _SKIP]


def _summary(manifest) -> Table:
    table = Table(title=f"preprocess: {len(manifest.kept_sources)} photo(s) kept")
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


def preprocess(
    in_dir: Path = typer.Argument(..., help="folder of the user's photos (only read)"),
    out_dir: Path = typer.Argument(..., help="output folder: images/, masks/, manifest.json"),
    **options,
) -> None:
    """Turn a folder of selfies into a training folder; say why each rejected photo was."""
    from ..preprocess import NotEnoughPhotosError, PreprocessConfig, PreprocessError
    from ..preprocess import preprocess_dir as run

    try:
        config = PreprocessConfig(**{k: v for k, v in options.items() if v is not None})
    except ConfigError as exc:
        _fail(str(exc))
    try:
        manifest = run(in_dir, out_dir, config, progress=True)
    except NotEnoughPhotosError as exc:
        from ..preprocess import load_manifest

        console.print(_summary(load_manifest(out_dir)))
        _fail(str(exc))
    except PreprocessError as exc:
        _fail(str(exc))
    console.print(_summary(manifest))
    console.print(f"{len(manifest.kept)} image(s) in {out_dir / 'images'}")
    console.print(f"manifest      {manifest.path}")
    console.print(f"contact sheet {out_dir / 'contact_sheet.png'}")


def samples(
    out_dir: Path = typer.Argument(..., help="folder to write the sample photos into"),
    hostile: bool = typer.Option(
        False, "--hostile", help="also write the hostile files (broken, empty, no face, ...)"
    ),
) -> None:
    """Write the sample photos (variants of a public-domain portrait) for tests and the demo."""
    from ..samples import write_hostile, write_samples

    paths = write_samples(out_dir)
    console.print(f"{len(paths)} sample photo(s) in {out_dir}")
    if hostile:
        expected = write_hostile(out_dir)
        for name, reason in expected.items():
            console.print(f"  {name}: {'kept (turned upright)' if reason is None else reason}")


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


def _with_config_options(func):
    """Give ``func`` one --option per config field (typer reads the signature)."""
    import inspect

    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    for name, f in _options():
        meta = f.metadata
        kind = _TYPES.get(f.type, f.type)  # fields are typed by string (postponed annotations)
        default = f.default
        hint = f"{meta['help']} [default: {default}]"
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            opt = typer.Option(None, f"{flag}/--no-{name.replace('_', '-')}", help=hint)
        elif meta.get("choices"):
            opt = typer.Option(None, flag, help=f"{hint} (one of {', '.join(meta['choices'])})")
        else:
            opt = typer.Option(None, flag, help=hint, min=meta.get("ge"), max=meta.get("le"))
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind | None
            )
        )

    def wrapper(**kwargs):
        return func(**kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__doc__ = func.__doc__
    wrapper.__name__ = func.__name__
    return wrapper


def register(app: typer.Typer) -> None:
    """Add this step's commands to the root app."""
    app.command("preprocess")(_with_config_options(preprocess))
    app.command("samples")(samples)
