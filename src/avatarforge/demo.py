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

import numpy as np
from PIL import Image
from rich.console import Console

from .base import BaseConfig, BaseInfo, load_pipeline, resolve_base
from .generate import GenArgs, from_jpeg_base64, generate_images, to_jpeg_base64
from .imaging import contact_sheet
from .paths import build_dir

log = logging.getLogger(__name__)
console = Console()

DEMO_USER = "demo"
# A short run at low resolution: the path, not the quality, is what the demo shows on a CPU.
DEMO_TRAIN = {
    "resolution": 128,
    "steps": 60,
    "learning_rate": 1e-2,  # high, so a short CPU run visibly moves the output
    "num_class_images": 8,
    "class_image_steps": 10,
    "checkpoint_every": 30,
}
DEMO_ARGS = GenArgs(steps=12, height=256, width=256, seed=7)
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
    adapter: Path | None = None
    package: Path | None = None
    local_images: list[Image.Image] = field(default_factory=list)
    triton_vs_local: int | None = None  # largest pixel difference, same JPEG encoding
    # one row per prompt: label -> image path, in column order (base, adapter, ...)
    rows: dict[str, dict[str, Path]] = field(default_factory=dict)


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


def _step_train(state: DemoState) -> None:
    from .train import TrainConfig, train

    assert state.dataset is not None and state.base is not None
    config = TrainConfig(**DEMO_TRAIN)
    result = train(state.dataset, state.out / "users" / DEMO_USER, config, state.base)
    state.adapter = result.adapter_dir
    size = sum(f.stat().st_size for f in state.adapter.iterdir()) / 1024
    console.print(
        f"  {result.steps} steps, mean loss of the first/last 10 steps "
        f"{sum(result.losses[:10]) / 10:.3f} -> {sum(result.losses[-10:]) / 10:.3f}, "
        f"{result.step_seconds:.2f} s/step; adapter {size:.0f} KiB at {state.adapter}"
    )


def _save_column(state: DemoState, column: str, images) -> None:
    folder = state.out / column.split()[0]
    folder.mkdir(parents=True, exist_ok=True)
    for i, (prompt, image) in enumerate(zip(PROMPTS, images, strict=True)):
        path = folder / f"{i}.jpg"
        image.save(path, quality=95)
        state.rows.setdefault(prompt, {})[column] = path


def _step_generate_local(state: DemoState) -> None:
    from .adapter import load_adapter

    assert state.base is not None and state.adapter is not None
    pipe = load_pipeline(state.base)
    before = [generate_images(pipe, p, None, DEMO_ARGS)[0] for p in PROMPTS]
    load_adapter(pipe, state.adapter, state.base, DEMO_USER)
    after = [generate_images(pipe, p, None, DEMO_ARGS)[0] for p in PROMPTS]
    _save_column(state, "base", before)
    _save_column(state, "local", after)
    state.local_images = after
    # The tiny base's random VAE paints similar textures for any latent: show what moved.
    diffs = [_difference(a, b) for a, b in zip(before, after, strict=True)]
    _save_column(state, "diff x8", [image for image, _ in diffs])
    mean = sum(d for _, d in diffs) / len(diffs)
    console.print(f"  before/after in {state.out}; mean |after - before| {mean:.1f}/255")


def _difference(a: Image.Image, b: Image.Image) -> tuple[Image.Image, float]:
    delta = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return Image.fromarray(np.clip(delta * 8, 0, 255).astype(np.uint8)), float(delta.mean())


def _step_package(state: DemoState) -> None:
    from .serving.package import package_user

    assert state.base is not None and state.adapter is not None
    state.package = package_user(DEMO_USER, state.adapter, build_dir() / "package", base=state.base)
    size = state.package.stat().st_size / 1024
    console.print(f"  {state.package} ({size:.0f} KiB; `make local-triton` serves it too)")


def _step_serve(state: DemoState) -> None:
    from .serving.client import generate
    from .serving.config import local_instance_env
    from .serving.repository import build_repository
    from .serving.server import tritonserver

    assert state.base is not None and state.package is not None
    repo = state.out / "triton" / "repository"
    (user,) = build_repository(repo, [state.package])
    env = local_instance_env(state.base.path, state.out / "triton" / "shared")
    log_path = state.out / "triton" / "tritonserver.log"
    with tritonserver([repo], load=["model_setup", user], env=env, log_path=log_path) as server:
        console.print(f"  tritonserver at http://{server.url} ready in {server.started_s:.1f} s")
        args = DEMO_ARGS.to_dict()
        images = [generate(server.url, user, prompt, None, args)[0] for prompt in PROMPTS]
    _save_column(state, "triton", images)
    # the server sends JPEGs: compare with the diffusers images through the same encoder
    local = [from_jpeg_base64(to_jpeg_base64(image)) for image in state.local_images]
    worst = state.triton_vs_local = max(_distance(a, b) for a, b in zip(local, images, strict=True))
    console.print(
        f"  {len(images)} images through tritonserver in {state.out / 'triton'}; "
        f"largest pixel difference from the diffusers path {worst}/255; log {log_path}"
    )


def _distance(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def _step_contact_sheet(state: DemoState) -> None:
    columns = list(next(iter(state.rows.values())))
    sheet = contact_sheet(
        [list(row.values()) for row in state.rows.values()],
        [f"{prompt}  [{' | '.join(columns)}]" for prompt in state.rows],
        cell=192,
        title="avatarforge demo: one row per prompt (tiny random base: textures, not faces)",
    )
    path = state.out / "contact_sheet.png"
    sheet.save(path)
    console.print(f"  contact sheet: [bold]{path}[/]")


STEPS: tuple[tuple[str, Callable[[DemoState], None]], ...] = (
    ("build the embedded tiny SD 2.1-shaped base", _step_base),
    ("preprocess the sample selfies", _step_preprocess),
    ("train a DreamBooth LoRA for the demo user", _step_train),
    ("generate before/after with diffusers", _step_generate_local),
    ("package the demo user as a Triton model", _step_package),
    ("serve it from tritonserver and generate", _step_serve),
    ("draw the contact sheet", _step_contact_sheet),
)


def run_demo(out: Path | None = None) -> DemoState:
    """Run every step into ``out`` (default build/demo); the state says what was made."""
    state = DemoState(out=(out or build_dir() / "demo").resolve())
    state.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    for i, (title, step) in enumerate(STEPS, 1):
        console.rule(f"[bold]{i}/{len(STEPS)}[/] {title}")
        started = time.perf_counter()
        step(state)
        console.print(f"  [dim]{time.perf_counter() - started:.1f} s[/]")
    console.rule(f"[bold green]done[/] in {time.perf_counter() - began:.0f} s")
    console.print(f"  photos before/after   {state.dataset / 'contact_sheet.png'}")
    console.print(f"  generated images      {state.out / 'contact_sheet.png'}")
    console.print(f"  the demo user's model {state.package}")
    return state
