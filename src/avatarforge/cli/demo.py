"""`avatarforge demo`: the whole path end to end on the tiny base and sample photos."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from .common import Bar, console, step_printers


def demo(
    out: Path = typer.Option(None, help="output folder (default: build/demo)"),
) -> None:
    """Run every step on the tiny base and the sample photos; images + contact sheet in build/demo/.

    Steps: base, samples -> preprocess, train, generate with diffusers, eval (identity and
    leakage), package, tritonserver (generate + a style pack's gallery), contact sheet. About a
    minute on a 2-core CPU.
    """
    from ..demos.local import STEPS, run_demo

    began = time.perf_counter()
    bar = Bar()  # within a step: images, denoising steps, photos (training shows its own)
    on_step, on_done = step_printers(len(STEPS), bar)
    try:
        state = run_demo(out, on_step=on_step, on_done=on_done, on_progress=bar)
    finally:
        bar.close()
    console.rule(f"[bold green]done[/] in {time.perf_counter() - began:.0f} s")
    console.print(f"  photos before/after   {state.dataset / 'contact_sheet.png'}")
    console.print(f"  generated images      {state.out / 'contact_sheet.png'}")
    console.print(f"  the demo user's model {state.package}")
    console.print(
        f"  quality report        {state.eval_report} (grid: {state.eval_grid})", soft_wrap=True
    )
    console.print(
        f"  avatar gallery        {state.gallery} (sheet: {state.gallery_sheet})", soft_wrap=True
    )


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
