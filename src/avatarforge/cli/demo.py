"""`avatarforge demo`: the whole path end to end on the tiny base and sample photos."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out: Path = typer.Option(None, help="output folder (default: build/demo)"),
) -> None:
    """Run every step on the tiny base and the sample photos; images + contact sheet in build/demo/.

    Steps: base, samples -> preprocess, train, generate with diffusers, package, tritonserver,
    contact sheet. About a minute on a 2-core CPU.
    """
    from ..demo import run_demo

    run_demo(out)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
