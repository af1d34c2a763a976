"""What every command shares: the console, clear errors, writing images, options from a config."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterable
from pathlib import Path

import typer
from PIL import Image
from rich.console import Console

console = Console()


def fail(message: str, code: int = 1) -> typing.NoReturn:
    """Print a clear error and exit non-zero (no traceback for expected errors)."""
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)  # one line, greppable
    raise typer.Exit(code)


def save_images(
    images: Iterable[Image.Image], folder: Path, *, suffix: str = "", image_format: str = "jpeg"
) -> list[Path]:
    """Write ``NN<suffix>.jpg`` (or ``.png``) into ``folder``; print each path on its own line
    (plain print: scripts read the paths from stdout)."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = "jpg" if image_format == "jpeg" else "png"
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i:02d}{suffix}.{ext}"
        if image_format == "jpeg":
            image.convert("RGB").save(path, format="JPEG", quality=95)
        else:
            image.save(path, format="PNG")
        print(path)
        paths.append(path)
    return paths


def _option(f: dataclasses.Field, kind: type, panel: str):
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    flag = "--" + f.name.replace("_", "-")
    help_text = meta.get("help") or ""
    if meta.get("choices"):
        # listed, not enforced here: the config's own check names the field in its error
        help_text += f" (one of {', '.join(map(str, meta['choices']))})"
    if kind is bool:
        return typer.Option(
            default, f"{flag}/--no-{flag[2:]}", help=help_text, rich_help_panel=panel
        )
    return typer.Option(
        default, flag, help=help_text, min=meta.get("ge"), max=meta.get("le"), rich_help_panel=panel
    )


def config_options(cls: type, *, skip: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Give a command one ``--option`` per field of the Settings dataclass ``cls`` (default, help,
    bounds from :func:`~avatarforge.settings.setting`); the command takes them as ``**options``.

    Typer reads the command's signature, so the fields are added to it in place of ``**options``.
    """
    hints = typing.get_type_hints(cls)  # fields are typed by string (postponed annotations)

    def decorate(func: Callable) -> Callable:
        sig = inspect.signature(func)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            option = _option(f, hints[f.name], cls.section)
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hints[f.name]
                )
            )
        func.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return func

    return decorate
