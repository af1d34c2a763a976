"""`avatarforge demo`: the whole path end to end on the tiny base and sample photos."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(None, help="output folder (default: build/demo)"),
) -> None:
    """Run every step on the embedded tiny base and the sample photos; leaves images and a
    contact sheet in build/demo/."""
    from ..demo import run_demo

    run_demo(out)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
