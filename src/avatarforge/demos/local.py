"""`make demo`: the whole path on the embedded tiny base and the sample photos.

Each step calls the same library functions the CLI calls; what it makes lands in build/demo/
and the last step draws a contact sheet of it. Nothing here prints: each step returns a line on
what it made, and :func:`run_demo` hands it to its caller (``avatarforge demo`` prints it), as
it hands on each step's progress (``on_progress``: a step can take minutes on a CPU). Training
shows its own progress bars (its ``progress`` setting).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..base.config import BaseConfig, resolve_base
from ..base.identity import BaseInfo
from ..base.pipeline import load_pipeline
from ..generate import GenArgs, from_jpeg_base64, generate_images, to_jpeg_base64
from ..imaging import contact_sheet
from ..paths import build_dir
from .steps import run_steps

log = logging.getLogger(__name__)

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
# Quality and the gallery, kept to seconds: a few small images (the tiny base makes no faces:
# the report says that it measures nothing; the path is what the demo shows).
DEMO_EVAL = {"prompts": 2, "seeds": 1, "steps": 4, "size": 128, "max_references": 6}
DEMO_PACK = "classic"
DEMO_PACK_ARGS = {"steps": 4, "height": 128, "width": 128}


Progress = Callable[[int, int, str], None]  # (done, total, what); total 0: not countable


def _silent(done: int, total: int, what: str) -> None:
    pass


@dataclass
class DemoState:
    out: Path
    progress: Progress = _silent
    base: BaseInfo | None = None
    dataset: Path | None = None
    adapter: Path | None = None
    package: Path | None = None
    local_images: list[Image.Image] = field(default_factory=list)
    triton_vs_local: int | None = None  # largest pixel difference, same JPEG encoding
    # one row per prompt: label -> image path, in column order (base, adapter, ...)
    rows: dict[str, dict[str, Path]] = field(default_factory=dict)
    eval_report: Path | None = None  # avatarforge eval: report.json, and its grid.png
    eval_grid: Path | None = None
    gallery: Path | None = None  # avatarforge avatars --pack: index.html, and its contact sheet
    gallery_sheet: Path | None = None


def _step_base(state: DemoState) -> str:
    state.progress(0, 0, "building the tiny base (the first run only)")
    base = state.base = resolve_base(BaseConfig())
    return f"base {base.base_id} ({base.content_hash[:12]}) at {base.path}"


def _step_preprocess(state: DemoState) -> str:
    from ..preprocess import preprocess_dir
    from ..testing.samples import write_samples

    photos = state.out / "photos"
    write_samples(photos)
    state.dataset = state.out / "dataset"
    manifest = preprocess_dir(
        photos, state.dataset, on_photo=lambda done, total, _: state.progress(done, total, "photos")
    )
    return (
        f"{len(manifest.kept_sources)} photos kept, {len(manifest.rejected)} rejected, "
        f"{len(manifest.kept)} training images\n"
        f"before/after sheet: {state.dataset / 'contact_sheet.png'}"
    )


def _step_train(state: DemoState) -> str:
    from ..train import TrainConfig, train

    assert state.dataset is not None and state.base is not None
    config = TrainConfig(**DEMO_TRAIN)
    result = train(state.dataset, state.out / "users" / DEMO_USER, config, state.base)
    state.adapter = result.adapter_dir
    size = sum(f.stat().st_size for f in state.adapter.iterdir()) / 1024
    return (
        f"{result.steps} steps, mean loss of the first/last 10 steps "
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


def _step_generate_local(state: DemoState) -> str:
    from ..adapter import load_adapter

    assert state.base is not None and state.adapter is not None
    state.progress(0, 0, "loading the base")
    pipe = load_pipeline(state.base)
    total = 2 * len(PROMPTS) * DEMO_ARGS.steps  # denoising steps, before and after

    def images(kind: str, first: int) -> list[Image.Image]:
        out = []
        for i, prompt in enumerate(PROMPTS):
            done = (first + i) * DEMO_ARGS.steps
            what = f"{kind}: image {i + 1} of {len(PROMPTS)}"

            def report(step: int, _: int, done: int = done, what: str = what) -> None:
                state.progress(done + step, total, what)

            out.append(generate_images(pipe, prompt, None, DEMO_ARGS, on_step=report)[0])
        return out

    before = images("base", 0)
    load_adapter(pipe, state.adapter, state.base, DEMO_USER)
    after = images("adapter", len(PROMPTS))
    _save_column(state, "base", before)
    _save_column(state, "local", after)
    state.local_images = after
    # The tiny base's random VAE paints similar textures for any latent: show what moved.
    diffs = [_difference(a, b) for a, b in zip(before, after, strict=True)]
    _save_column(state, "diff x8", [image for image, _ in diffs])
    mean = sum(d for _, d in diffs) / len(diffs)
    return f"before/after in {state.out}; mean |after - before| {mean:.1f}/255"


def _difference(a: Image.Image, b: Image.Image) -> tuple[Image.Image, float]:
    delta = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return Image.fromarray(np.clip(delta * 8, 0, 255).astype(np.uint8)), float(delta.mean())


def _step_eval(state: DemoState) -> str:
    from ..quality import EvalConfig, evaluate

    assert state.base is not None and state.adapter is not None and state.dataset is not None
    config = EvalConfig(**DEMO_EVAL)
    result = evaluate(
        DEMO_USER, state.adapter, state.dataset, state.out / "eval", config, base=state.base,
        on_image=lambda done, total: state.progress(done, total, "generate"),
        on_score=lambda done, total, _: state.progress(done, total, "score"),
    )  # fmt: skip
    state.eval_report, state.eval_grid = result.report_path, result.grid_path
    s = result.report.scores
    lines = [
        f"{s['images']} images, faces found in {s['face_found_rate']:.0%}; report "
        f"{result.report_path}, grid {result.grid_path}"
    ]
    if result.report.why:
        lines.append(result.report.why)
    return "\n".join(lines)


def _render_pack(state: DemoState, url: str, user: str) -> str:
    """The demo user's gallery of the classic style pack, rendered by the running server."""
    from ..packs import load_pack, render_gallery, targets

    started = time.perf_counter()
    files, rendered = render_gallery(
        user,
        load_pack(DEMO_PACK),
        targets.triton(url, user),
        state.out / "avatars" / DEMO_PACK,
        target=f"tritonserver {url}, model {user}",
        override=DEMO_PACK_ARGS,
        on_item=lambda done, total, _: state.progress(done, total, f"{DEMO_PACK} pack avatars"),
    )
    state.gallery, state.gallery_sheet = files.html, files.sheet
    seconds = time.perf_counter() - started
    return (
        f"{len(rendered)} avatars of the {DEMO_PACK} pack in {seconds:.1f} s: gallery {files.html}"
    )


def _step_package(state: DemoState) -> str:
    from ..serving.package import package_user

    assert state.base is not None and state.adapter is not None
    state.package = package_user(DEMO_USER, state.adapter, build_dir() / "package", base=state.base)
    size = state.package.stat().st_size / 1024
    return f"{state.package} ({size:.0f} KiB; `make local-triton` serves it too)"


def _step_serve(state: DemoState) -> str:
    from ..serving.client import generate
    from ..serving.config import local_instance_env
    from ..serving.repository import build_repository
    from ..tritonserver.launch import tritonserver

    assert state.base is not None and state.package is not None
    repo = state.out / "triton" / "repository"
    (user,) = build_repository(repo, [state.package])
    env = local_instance_env(state.base.path, state.out / "triton" / "shared")
    log_path = state.out / "triton" / "tritonserver.log"
    state.progress(0, 0, "starting tritonserver and loading the user's model")
    with tritonserver([repo], load=["model_setup", user], env=env, log_path=log_path) as server:
        ready = f"tritonserver at http://{server.url} ready in {server.started_s:.1f} s"
        args = DEMO_ARGS.to_dict()
        images = []
        for i, prompt in enumerate(PROMPTS):
            state.progress(i, len(PROMPTS), "images through tritonserver")
            images.append(generate(server.url, user, prompt, None, args)[0])
        avatars = _render_pack(state, server.url, user)
    _save_column(state, "triton", images)
    # the server sends JPEGs: compare with the diffusers images through the same encoder
    local = [from_jpeg_base64(to_jpeg_base64(image)) for image in state.local_images]
    worst = state.triton_vs_local = max(_distance(a, b) for a, b in zip(local, images, strict=True))
    return (
        f"{ready}\n{len(images)} images through tritonserver in {state.out / 'triton'}; "
        f"largest pixel difference from the diffusers path {worst}/255; log {log_path}\n"
        f"{avatars}"
    )


def _distance(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def _step_contact_sheet(state: DemoState) -> str:
    columns = list(next(iter(state.rows.values())))
    sheet = contact_sheet(
        [list(row.values()) for row in state.rows.values()],
        [f"{prompt}  [{' | '.join(columns)}]" for prompt in state.rows],
        cell=192,
        title="avatarforge demo: one row per prompt (tiny random base: textures, not faces)",
    )
    path = state.out / "contact_sheet.png"
    sheet.save(path)
    return f"contact sheet: {path}"


STEPS: tuple[tuple[str, Callable[[DemoState], str]], ...] = (
    ("build the embedded tiny SD 2.1-shaped base", _step_base),
    ("preprocess the sample selfies", _step_preprocess),
    ("train a DreamBooth LoRA for the demo user", _step_train),
    ("generate before/after with diffusers", _step_generate_local),
    ("evaluate identity and leakage (avatarforge eval)", _step_eval),
    ("package the demo user as a Triton model", _step_package),
    ("serve it from tritonserver, generate, render a style pack", _step_serve),
    ("draw the contact sheet", _step_contact_sheet),
)


def run_demo(
    out: Path | None = None,
    *,
    on_step: Callable[[int, str], None] | None = None,
    on_done: Callable[[int, str, float], None] | None = None,
    on_progress: Progress | None = None,
) -> DemoState:
    """Run every step into ``out`` (default build/demo); the state says what was made.

    ``on_step(i, title)`` before each step, ``on_done(i, what it made, seconds)`` after it,
    ``on_progress(done, total, what)`` within a step (``total`` 0: not countable).
    """
    state = DemoState(out=(out or build_dir() / "demo").resolve(), progress=on_progress or _silent)
    state.out.mkdir(parents=True, exist_ok=True)
    run_steps(STEPS, state, on_step, on_done)
    return state
