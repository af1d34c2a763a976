"""What every command shares: the console, clear errors, writing images, options from a config."""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import typing
from collections.abc import Callable, Iterable
from pathlib import Path

import rich.markup
import typer
from PIL import Image
from rich.console import Console
from typer.core import TyperGroup

from ..errors import AvatarforgeError

console = Console()


def fail(message: str, code: int = 1) -> typing.NoReturn:
    """Print a clear error and exit non-zero (no traceback for expected errors)."""
    # the message is text, not markup: "[a-z]" or "[[styles]]" must show as written
    console.print(f"[bold red]error:[/] {rich.markup.escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


class Commands(TyperGroup):
    """The root command group: the one place an :class:`~avatarforge.errors.AvatarforgeError`
    that a command did not handle itself becomes ``error: <message>`` and exit code 1 (no
    traceback). Commands catch an error only to say more or exit with another code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AvatarforgeError as exc:
            fail(str(exc))


def step_printers(
    total: int,
) -> tuple[Callable[[int, str], None], Callable[[int, str, float], None]]:
    """``on_step`` / ``on_done`` for the demos: a rule per step, then what it did and its time."""

    def on_step(i: int, title: str) -> None:
        console.rule(f"[bold]{i}/{total}[/] {title}")

    def on_done(i: int, what: str, seconds: float) -> None:
        for line in what.splitlines():
            console.print(f"  {line}", soft_wrap=True)
        console.print(f"  [dim]{seconds:.1f} s[/]")

    return on_step, on_done


def save_images(
    images: Iterable[Image.Image], folder: Path, *, suffix: str = "", image_format: str = "jpeg"
) -> list[Path]:
    """Encode each image and write it as a new ``NN<suffix>.jpg`` (or ``.png``) in ``folder``
    (:func:`write_new_files`: nothing is overwritten); print each path on its own line."""
    ext = "jpg" if image_format == "jpeg" else "png"
    files = []
    for image in images:
        buf = io.BytesIO()
        if image_format == "jpeg":
            image.convert("RGB").save(buf, format="JPEG", quality=95)
        else:
            image.save(buf, format="PNG")
        files.append(buf.getvalue())
    return write_new_files(files, folder, suffix=suffix, ext=ext)


def save_jpeg_bytes(images: Iterable[bytes], folder: Path) -> list[Path]:
    """Write each JPEG exactly as the server sent it (no re-encoding) as a new ``NN.jpg`` in
    ``folder``; print each path on its own line."""
    return write_new_files(images, folder, ext="jpg")


_NUMBERED = re.compile(r"^(\d+)(?!\d)")


def write_new_files(
    files: Iterable[bytes], folder: Path, *, suffix: str = "", ext: str = "jpg"
) -> list[Path]:
    """Write each file to the next number no file in ``folder`` starts with: ``NN<suffix>.<ext>``
    (00, 01, ...; an existing file is never overwritten, also by a writer running at the same
    time: files are created exclusively). Print each path on its own line (plain print: scripts
    read the paths from stdout)."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = {int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))}
    paths, index = [], 0
    for data in files:
        while True:
            while index in taken:
                index += 1
            path = folder / f"{index:02d}{suffix}.{ext}"
            taken.add(index)
            try:
                with open(path, "xb") as f:  # exclusive: fails if it exists, even in a race
                    f.write(data)
                break
            except FileExistsError:
                continue
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
