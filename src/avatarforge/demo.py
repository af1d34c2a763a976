"""`make demo`: the whole path on the embedded tiny base and the sample photos.

Each step calls the same library functions the CLI calls; what it makes lands in build/demo/
and the last step draws a contact sheet of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from .base import BaseConfig, BaseInfo, load_pipeline, resolve_base
from .generate import GenArgs, generate_images
from .imaging import contact_sheet
from .paths import build_dir

log = logging.getLogger(__name__)
console = Console()

PROMPTS = (
    "a photo of <<TOK>> person as an astronaut",
    "an oil painting of <<TOK>> person",
    "a pencil sketch of <<TOK>> person",
)


@dataclass
class DemoState:
    out: Path
    base: BaseInfo | None = None
    dataset: Path | None = None
    images: list[tuple[str, Path]] = field(default_factory=list)  # (label, path)


def _step_base(state: DemoState) -> None:
    base = state.base = resolve_base(BaseConfig())
    console.print(f"  base {base.base_id} ({base.content_hash[:12]}) at {base.path}")


def _step_preprocess(state: DemoState) -> None:
    from .preprocess import preprocess_dir
    from .samples import write_samples

    photos = state.out / "photos"
    write_samples(photos)
    state.dataset = state.out / "dataset"
    manifest = preprocess_dir(photos, state.dataset)
    console.print(
        f"  {len(manifest.kept_sources)} photos kept, {len(manifest.rejected)} rejected, "
        f"{len(manifest.kept)} training images"
    )
    console.print(f"  before/after sheet: [bold]{state.dataset / 'contact_sheet.png'}[/]")


def _step_generate_base(state: DemoState) -> None:
    assert state.base is not None
    pipe = load_pipeline(state.base)
    args = GenArgs(steps=10, height=256, width=256, seed=0)
    folder = state.out / "base"
    folder.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(PROMPTS):
        (image,) = generate_images(pipe, prompt.replace("<<TOK>> ", ""), None, args)
        path = folder / f"base_{i}.jpg"
        image.save(path, quality=95)
        state.images.append((f"base: {prompt}", path))
    console.print(f"  {len(PROMPTS)} images from the base in {folder}")


def _step_contact_sheet(state: DemoState) -> None:
    sheet = contact_sheet(
        [[path] for _, path in state.images],
        [label for label, _ in state.images],
        cell=192,
        title="avatarforge demo (tiny random base: textures, not faces)",
    )
    path = state.out / "contact_sheet.png"
    sheet.save(path)
    console.print(f"  contact sheet: [bold]{path}[/]")


STEPS: tuple[tuple[str, Callable[[DemoState], None]], ...] = (
    ("build the embedded tiny SD 2.1-shaped base", _step_base),
    ("preprocess the sample selfies", _step_preprocess),
    ("generate from the base", _step_generate_base),
    ("draw the contact sheet", _step_contact_sheet),
)


def run_demo(out: Path | None = None) -> DemoState:
    state = DemoState(out=(out or build_dir() / "demo").resolve())
    state.out.mkdir(parents=True, exist_ok=True)
    for i, (title, step) in enumerate(STEPS, 1):
        console.rule(f"[bold]{i}/{len(STEPS)}[/] {title}")
        started = time.perf_counter()
        step(state)
        console.print(f"  [dim]{time.perf_counter() - started:.1f} s[/]")
    return state
