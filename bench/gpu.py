"""Full-size SD 2.1 on one GPU: generation latency, adapter switching, training, Triton path.

    PYTHONPATH=src python3 bench/gpu.py [--budget-s 420] [--clip-bpe FILE] [--out-dir DIR]
    python bench/gpu.py --tiny            # the same code paths on the tiny base, CPU, seconds
    python bench/gpu.py --device cpu --only adapters   # full-size adapter switching on a CPU

Measurements (each in its own function; a failure is recorded with its error and the others
still run; one that does not fit in what is left of --budget-s is skipped, and says so):

  base         build (or reuse) the full-size random SD 2.1-base and load it as a pipeline
  generation   512 px, 30 DDIM steps, batch 1: plain diffusers vs avatarforge generate_images
  adapters     switching between two default-rank adapters (real file format) through today's
               AdapterCache (capacity 1: unload + load; capacity 2: set_adapters) and through
               the LoRA slots (one slot read cold from disk; one slot from the host cache;
               resident in 8 slots), the output checked against a fresh pipeline with that
               adapter (same seed), CUDA and host-cache memory after 1 and N users
  batching     requests of 16 users (one default-rank adapter each), as the shared base gets
               them from Triton (batches of 8 requests): one row at a time vs one UNet batch
               per execute with a LoRA per row; images/s, max pixel difference, peak memory
  training     avatarforge train() with the default TrainConfig except steps and class images,
               on 10 synthetic photos: step time, projection to 800 steps, peak CUDA memory
  training_no_checkpointing   the same with gradient checkpointing off
  triton       the local MME (tritonserver) on the same base, where nvidia-pytriton is installed

Every figure, the card and the versions go to build/bench/gpu.json (gpu-tiny.json, gpu-cpu.json
for the reduced modes; also copied to --out-dir), written after each measurement so that a
crash keeps what was measured. New variants (hot-swap slots, host caches, batching) are one more
entry in GENERATION_PATHS or SWITCH_PATHS, or one more measurement in MEASUREMENTS.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _results import write_results

PROMPT = "a photo of <<TOK>> person"

# Per mode: the workload, and how long each measurement is expected to take (seconds; a
# measurement is skipped when its estimate exceeds what is left of the budget). "gpu" figures
# are for an H100; "cpu" runs the full-size base on a CPU at a tiny image size.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {"size": 512, "steps": 30, "runs": 5, "switches": 8, "check_steps": 10,
            "train_steps": 30, "class_images": 8, "class_image_steps": 25, "resolution": 512,
            "users": 16, "requests": 16, "memory_users": 10},
    "cpu": {"size": 64, "steps": 2, "runs": 3, "switches": 6, "check_steps": 2,
            "train_steps": 2, "class_images": 2, "class_image_steps": 2, "resolution": 64,
            "users": 4, "requests": 8, "memory_users": 4},
    "tiny": {"size": 64, "steps": 2, "runs": 3, "switches": 4, "check_steps": 2,
             "train_steps": 3, "class_images": 2, "class_image_steps": 2, "resolution": 64,
             "users": 4, "requests": 8, "memory_users": 4},
}  # fmt: skip
ESTIMATES_S: dict[str, dict[str, float]] = {
    "gpu": {"base": 90, "generation": 45, "adapters": 75, "batching": 90, "training": 120,
            "training_no_checkpointing": 90, "triton": 150},
    "cpu": {"base": 150, "generation": 120, "adapters": 300, "batching": 240, "training": 300,
            "training_no_checkpointing": 300, "triton": 300},
    "tiny": {"base": 10, "generation": 10, "adapters": 15, "batching": 15, "training": 20,
             "training_no_checkpointing": 15, "triton": 120},
}  # fmt: skip
WARMUP_STEPS = 3  # training steps left out of the median (allocator and autotuning warm-up)
PROJECTED_STEPS = 800  # TrainConfig's default steps
PROJECTED_CLASS_IMAGES = 50  # TrainConfig's default num_class_images


# ---------------------------------------------------------------- run state


@dataclass
class Ctx:
    """What measurements share: options, the base, one pipeline, two adapters, a work folder."""

    opts: argparse.Namespace
    mode: str  # gpu | cpu | tiny
    device: str
    work: Path
    deadline: float
    base: Any = None
    base_error: str = ""
    _pipe: Any = None
    _adapters: list[Path] = field(default_factory=list)
    _dataset: tuple[Path, str] | None = None

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def need_base(self):
        if self.base is None:
            raise RuntimeError(f"no base: {self.base_error or 'the base measurement did not run'}")
        return self.base

    def pipeline(self):
        """The shared pipeline of the base on the device (fp16 on CUDA, fp32 on CPU)."""
        if self._pipe is None:
            from avatarforge.base.pipeline import load_pipeline

            self._pipe = load_pipeline(self.need_base(), device=self.device)
        return self._pipe

    def release(self) -> None:
        """Drop the pipeline: training's peak memory must be training's alone."""
        self._pipe = None
        free_memory()

    def adapters(self, count: int = 2) -> list[Path]:
        """``count`` real adapters at the default rank (TrainConfig), random non-zero weights
        (the first two are users a and b)."""
        from avatarforge.fullsize import random_adapter
        from avatarforge.train import TrainConfig

        d = TrainConfig()
        while len(self._adapters) < count:
            i = len(self._adapters)
            name = "ab"[i] if i < 2 else f"user{i}"
            self._adapters.append(
                random_adapter(
                    self.need_base(),
                    self.work / f"adapter-{name}",
                    i + 1,
                    unet_rank=d.unet_rank,
                    unet_alpha=d.unet_alpha,
                    text_encoder_rank=d.text_encoder_rank,
                    text_encoder_alpha=d.text_encoder_alpha,
                )
            )
        return self._adapters[:count]

    def dataset(self) -> tuple[Path, str]:
        """10 photos in the preprocess contract, and what they are."""
        if self._dataset is None:
            self._dataset = write_photos(self.work / "photos", 10)
        return self._dataset


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fig(value: Any, unit: str = "", note: str = "") -> dict[str, Any]:
    """One figure of the summary table."""
    out: dict[str, Any] = {"value": value, "unit": unit}
    if note:
        out["note"] = note
    return out


def max_pixel_diff(a, b) -> int:
    import numpy as np

    pa = np.asarray(a.convert("RGB"), dtype=np.int16)
    pb = np.asarray(b.convert("RGB"), dtype=np.int16)
    return int(np.abs(pa - pb).max())


def write_photos(out: Path, count: int = 10) -> tuple[Path, str]:
    """``count`` photos in the preprocess contract (manifest version 1, read by
    avatarforge.train.data.read_dataset): 512 px crops of skimage's astronaut portrait, or
    generated pictures where scikit-image is not installed."""
    from PIL import Image, ImageDraw

    try:
        from skimage import data

        source = Image.fromarray(data.astronaut())
        what = f"{count} synthetic photos: 512 px crops of skimage's astronaut portrait"
    except ImportError:
        source = None
        what = f"{count} generated pictures (scikit-image is not installed)"
    (out / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        if source is not None:
            box = (20 + 10 * i, 5 + 8 * i, 320 + 10 * i, 305 + 8 * i)
            img = source.crop(box).resize((512, 512), Image.Resampling.BICUBIC)
        else:
            img = Image.new("RGB", (512, 512), (40 + 15 * i, 90, 160 - 10 * i))
            ImageDraw.Draw(img).ellipse((150 + 5 * i, 100, 360 + 5 * i, 380), fill=(225, 180, 150))
        name = f"photo-{i:02d}.png"
        img.save(out / "images" / name)
        items.append(
            {
                "source": f"photo-{i:02d}.jpg",
                "status": "kept",
                "reason": None,
                "image": f"images/{name}",
                "mask": None,
                "face_box": None,
                "scores": {},
            }
        )
    manifest = {"version": 1, "config": {}, "items": items, "kept": count, "rejected": 0}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out, what


# ---------------------------------------------------------------- environment


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", None)
    except ImportError:
        return None


def _dist_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, Any]:
    """The machine and the versions the figures were measured with."""
    import torch

    env: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": {
            m: _version(m)
            for m in (
                "torch",
                "diffusers",
                "peft",
                "transformers",
                "accelerate",
                "safetensors",
                "numpy",
                "PIL",
            )
        }
        | {d: _dist_version(d) for d in ("nvidia-pytriton", "bitsandbytes")},
        "torch_cuda": torch.version.cuda,
    }
    if device.startswith("cuda"):
        try:
            props = torch.cuda.get_device_properties(0)
            env |= {
                "gpu": torch.cuda.get_device_name(0),
                "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}",
                "bf16_supported": torch.cuda.is_bf16_supported(),
                "cudnn": torch.backends.cudnn.version(),
            }
        except RuntimeError as exc:  # recorded: the measurements will say more
            env["gpu_error"] = str(exc)
        env["driver"] = _nvidia_smi("driver_version")
    return env


def _nvidia_smi(field_name: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# ---------------------------------------------------------------- measurements


def measure_base(ctx: Ctx) -> dict[str, Any]:
    """Build (or reuse) the base, then load it as a pipeline on the device."""
    from avatarforge.base.config import BaseConfig, resolve_base

    t0 = time.perf_counter()
    if ctx.mode == "tiny":
        base = resolve_base(BaseConfig())
    else:
        from avatarforge.fullsize import build_full_base

        base = build_full_base(bpe=ctx.opts.clip_bpe, device=ctx.device)
    build_s = time.perf_counter() - t0
    ctx.base = base
    free_memory()  # the weights drawn on the device for the build are garbage now
    size = sum(p.stat().st_size for p in base.path.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    pipe = ctx.pipeline()
    sync(ctx.device)
    load_s = time.perf_counter() - t0
    params = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "vae", "text_encoder")
    }
    figures = {}
    if ctx.device.startswith("cuda"):
        import torch

        figures["pipeline in CUDA memory"] = fig(
            round(torch.cuda.memory_allocated() / 2**30, 2), "GiB"
        )
    return {
        "base_id": base.base_id,
        "content_hash": base.content_hash,
        "path": str(base.path),
        "params": params,
        "figures": {
            "build (or find cached) base": fig(round(build_s, 2), "s"),
            "base on disk": fig(round(size / 2**30, 2), "GiB"),
            "load pipeline onto device": fig(round(load_s, 2), "s", str(pipe.unet.dtype)),
            "UNet params": fig(round(params["unet"] / 1e6, 1), "M"),
            "VAE params": fig(round(params["vae"] / 1e6, 1), "M"),
            "text encoder params": fig(round(params["text_encoder"] / 1e6, 1), "M"),
            **figures,
        },
    }


def _plain_diffusers(pipe, args):
    """The stock diffusers call (no avatarforge code): the reference of the overhead."""
    import torch

    generator = torch.Generator("cpu").manual_seed(args.seed)
    return pipe(
        prompt=PROMPT,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        generator=generator,
    ).images[0]


def _ours(pipe, args):
    from avatarforge.generate import generate_images

    return generate_images(pipe, PROMPT, None, args)[0]


# name -> function(pipe, GenArgs) -> one image; the first is the reference of the ratios.
GENERATION_PATHS: dict[str, Callable] = {
    "plain diffusers pipeline": _plain_diffusers,
    "avatarforge generate_images": _ours,
}


def measure_generation(ctx: Ctx) -> dict[str, Any]:
    import torch

    from avatarforge.generate import GenArgs

    o = ctx.opts
    pipe = ctx.pipeline()
    args = GenArgs(steps=o.steps, height=o.size, width=o.size, seed=o.seed)
    images = {name: fn(pipe, args) for name, fn in GENERATION_PATHS.items()}  # warm-up
    if ctx.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {name: [] for name in GENERATION_PATHS}
    for _ in range(o.runs):  # interleaved, so drift (clocks, heat) hits both alike
        if ctx.left() < 0:
            break
        for name, fn in GENERATION_PATHS.items():
            t0 = time.perf_counter()
            fn(pipe, args)
            sync(ctx.device)
            times[name].append(time.perf_counter() - t0)
    ref_name = next(iter(GENERATION_PATHS))
    ref = median(times[ref_name])
    figures = {}
    for name, values in times.items():
        figures[f"{name}, median"] = fig(round(median(values), 4), "s/image")
        if name != ref_name:
            figures[f"{name} / {ref_name}"] = fig(
                round(median(values) / ref, 4), "x", "overhead of our wrapper"
            )
            figures[f"{name} vs {ref_name}: max pixel diff"] = fig(
                max_pixel_diff(images[name], images[ref_name]), "/255"
            )
    figures["steps per second (whole image, plain)"] = fig(round(o.steps / ref, 2), "it/s")
    if ctx.device.startswith("cuda"):
        figures["peak CUDA memory while generating"] = fig(
            round(torch.cuda.max_memory_allocated() / 2**30, 2), "GiB"
        )
    return {
        "workload": f"{o.size}x{o.size}, {o.steps} DDIM steps, guidance 7.5, batch 1",
        "runs": {k: len(v) for k, v in times.items()},
        "seconds": times,
        "figures": figures,
    }


def _adapter_cache(capacity: int) -> Callable:
    def make(pipe, base):
        from avatarforge.serving.adapter_cache import AdapterCache

        cache = AdapterCache(pipe, base, capacity=capacity)
        return (lambda folder: cache.activate(str(folder))), cache.clear, None

    return make


def _slots(count: int, host_cache_bytes: int) -> Callable:
    def make(pipe, base):
        from avatarforge.serving.adapter_cache import SlotAdapterCache

        cache = SlotAdapterCache(pipe, base, slots=count, host_cache_bytes=host_cache_bytes)
        return (lambda folder: cache.activate(str(folder))), cache.clear, cache.memory

    return make


# name -> make(pipe, base) -> (activate(folder), close(), memory() -> dict or None); each path
# starts and ends with the bare pipeline.
SWITCH_PATHS: dict[str, Callable] = {
    "today, capacity 1 (unload + load)": _adapter_cache(1),
    "today, capacity 2 (set_adapters)": _adapter_cache(2),
    "slots, cold from disk (1 slot, no host cache)": _slots(1, 0),
    "slots, from the host cache (1 slot)": _slots(1, 2**40),
    "slots, resident (8 slots)": _slots(8, 2**40),
}


def measure_adapters(ctx: Ctx) -> dict[str, Any]:
    import torch

    from avatarforge.adapter import WEIGHTS_FILE, load_adapter
    from avatarforge.base.pipeline import load_pipeline
    from avatarforge.generate import GenArgs

    o = ctx.opts
    base = ctx.need_base()
    t0 = time.perf_counter()
    adapters = ctx.adapters()
    make_s = time.perf_counter() - t0
    pipe = ctx.pipeline()
    check = GenArgs(steps=o.check_steps, height=o.size, width=o.size, seed=o.seed)
    cuda = ctx.device.startswith("cuda")

    # the reference: each adapter loaded into a fresh pipeline of the base
    reference = {}
    for folder in adapters:
        fresh = load_pipeline(base, device=ctx.device)
        load_adapter(fresh, folder, base, "reference")
        reference[folder] = _ours(fresh, check)
        del fresh
        free_memory()
    bare = _ours(pipe, check)
    figures: dict[str, Any] = {
        "adapter file (fp16, UNet + text encoder)": fig(
            round((adapters[0] / WEIGHTS_FILE).stat().st_size / 2**20, 2), "MiB"
        ),
        "make two adapters (random_adapter)": fig(round(make_s, 2), "s"),
        "adapter a vs b: max pixel diff": fig(
            max_pixel_diff(reference[adapters[0]], reference[adapters[1]]),
            "/255",
            "must be > 0: the adapters differ",
        ),
        "adapter a vs bare base: max pixel diff": fig(
            max_pixel_diff(reference[adapters[0]], bare), "/255", "must be > 0"
        ),
    }
    details: dict[str, Any] = {}
    for name, make in SWITCH_PATHS.items():
        activate, close, memory = make(pipe, base)
        try:
            mem0 = torch.cuda.memory_allocated() if cuda else 0
            t0 = time.perf_counter()
            activate(adapters[0])
            sync(ctx.device)
            first_s = time.perf_counter() - t0
            mem1 = torch.cuda.memory_allocated() if cuda else 0
            switches = []
            for i in range(1 + o.switches):  # the first switch is a warm-up
                if ctx.left() < 0 and len(switches) >= 2:
                    break
                t0 = time.perf_counter()
                activate(adapters[(i + 1) % 2])
                sync(ctx.device)
                switches.append(time.perf_counter() - t0)
            mem2 = torch.cuda.memory_allocated() if cuda else 0
            diffs = []
            for folder in adapters:
                activate(folder)
                diffs.append(max_pixel_diff(_ours(pipe, check), reference[folder]))
            for folder in ctx.adapters(o.memory_users):  # N distinct users, one after another
                activate(folder)
            sync(ctx.device)
            mem_n = torch.cuda.memory_allocated() if cuda else 0
            held = memory() if memory is not None else None
        finally:
            close()
        timed = switches[1:] or switches
        # 4 significant digits: a resident slot switches in microseconds
        figures[f"{name}: switch, median"] = fig(float(f"{median(timed):.4g}"), "s")
        figures[f"{name}: first activation"] = fig(float(f"{first_s:.4g}"), "s")
        figures[f"{name}: vs fresh pipeline, max pixel diff"] = fig(
            max(diffs), "/255", "0 = same pixels"
        )
        if cuda:
            figures[f"{name}: CUDA memory, 1 adapter loaded"] = fig(
                round((mem1 - mem0) / 2**20, 1), "MiB"
            )
            figures[f"{name}: CUDA memory after switching"] = fig(
                round((mem2 - mem0) / 2**20, 1), "MiB"
            )
            figures[f"{name}: CUDA memory after {o.memory_users} users"] = fig(
                round((mem_n - mem0) / 2**20, 1), "MiB"
            )
        if held is not None:
            figures[f"{name}: host cache after {o.memory_users} users"] = fig(
                round(held["host_cache_bytes"] / 2**20, 1),
                "MiB",
                f"{held['host_cache_adapters']} adapters"
                + ("; pinned: each block rounds up to a power of two" if cuda else ""),
            )
        details[name] = {
            "switch_seconds": switches,
            "first_activation_s": first_s,
            "max_pixel_diff_per_adapter": diffs,
        }
    return {
        "rank": "TrainConfig defaults (UNet r8/alpha 8, text encoder r8/alpha 8)",
        "check": f"{o.size}x{o.size}, {o.check_steps} steps, seed {o.seed}",
        "paths": details,
        "figures": figures,
    }


def _base_request(prompt: str, adapter: Path, args) -> dict[str, Any]:
    """One request as the shared base's execute() hands it to SharedBase.handle."""
    import numpy as np

    def column(text: str):
        return np.array([[text.encode()]], dtype=object)

    return {
        "prompt": column(prompt),
        "gen_args": column(json.dumps(args.to_dict())),
        "adapter": column(str(adapter)),
    }


def measure_batching(ctx: Ctx) -> dict[str, Any]:
    """Requests of many users through the shared base in Triton batches of 8 requests (its
    max_batch_size): one row at a time (ServingConfig.batching off) vs one UNet batch per
    execute with a LoRA per row, interleaved; the same requests, seeds per request."""
    import torch

    from avatarforge.generate import GenArgs, from_jpeg_base64
    from avatarforge.serving.handler import Job, Row
    from avatarforge.serving.shared_base import SharedBase

    o = ctx.opts
    base = ctx.need_base()
    users = ctx.adapters(o.users)
    pipe = ctx.pipeline()
    cuda = ctx.device.startswith("cuda")
    args = [
        GenArgs(steps=o.steps, height=o.size, width=o.size, seed=o.seed + i)
        for i in range(o.requests)
    ]
    requests = [_base_request(PROMPT, users[i % len(users)], a) for i, a in enumerate(args)]
    batches = [requests[i : i + 8] for i in range(0, len(requests), 8)]
    shared = SharedBase(pipe, base, batch_max_images=8)
    peak: dict[bool, float] = {}

    def serve(batching: bool, some=None) -> tuple[list, float]:
        shared.batching = batching
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = [r for batch in (some or batches) for r in shared.handle(batch)]
        sync(ctx.device)
        seconds = time.perf_counter() - t0
        if cuda:
            peak[batching] = max(peak.get(batching, 0), torch.cuda.max_memory_allocated())
        failed = [r for r in out if isinstance(r, Exception)]
        if failed:
            raise RuntimeError(f"{len(failed)} request(s) failed: {failed[0]}")
        return out, seconds

    try:
        serve(True, batches[:1])  # warm-up: adapters into the host cache, kernels for the shapes
        serve(False, [batches[0][:1]])
        times: dict[bool, list[float]] = {True: [], False: []}
        outputs: dict[bool, list] = {}
        for _ in range(max(1, min(o.runs, 2))):  # interleaved, so drift hits both alike
            if ctx.left() < 0 and times[True]:
                break
            for batching in (True, False):
                outputs[batching], seconds = serve(batching)
                times[batching].append(seconds)
        jpeg_diff = max(
            max_pixel_diff(from_jpeg_base64(b[0][0]), from_jpeg_base64(s[0][0]))
            for b, s in zip(outputs[True], outputs[False], strict=True)
        )
        # before JPEG, at check_steps: one batch of 8 rows as one call vs each row alone
        check_args = [
            GenArgs(steps=o.check_steps, height=o.size, width=o.size, seed=o.seed + i)
            for i in range(min(8, len(users)))
        ]
        check = [Job(i, 0, Row(PROMPT, None, a), users[i]) for i, a in enumerate(check_args)]
        together = shared.generate_jobs(check)
        raw_diff = max(
            max_pixel_diff(images[0], shared.generate_jobs([job])[0][0])
            for images, job in zip(together, check, strict=True)
        )
    finally:
        shared.cache.clear()  # the pipeline is the bare base again for what follows
    batched, alone = median(times[True]), median(times[False])
    figures = {
        "one at a time": fig(round(o.requests / alone, 3), "images/s"),
        "batched (one UNet batch per execute)": fig(round(o.requests / batched, 3), "images/s"),
        "batched / one at a time": fig(round(alone / batched, 2), "x", "throughput"),
        "batched vs alone (before JPEG): max pixel diff": fig(
            raw_diff, "/255", f"{len(check)} rows at {o.check_steps} steps; summation order only"
        ),
        "batched vs one at a time (JPEG both): max pixel diff": fig(jpeg_diff, "/255"),
    }
    if cuda:
        figures["peak CUDA memory, one at a time"] = fig(round(peak[False] / 2**30, 2), "GiB")
        figures["peak CUDA memory, batched"] = fig(round(peak[True] / 2**30, 2), "GiB")
    return {
        "workload": f"{o.requests} requests over {len(users)} users (default-rank adapters), "
        f"{o.size}x{o.size}, {o.steps} DDIM steps, guidance 7.5, 1 image each, Triton batches "
        "of 8 requests",
        "seconds": {"batched": times[True], "one at a time": times[False]},
        "figures": figures,
    }


def _measure_training(ctx: Ctx, checkpointing: bool) -> dict[str, Any]:
    from avatarforge.train import TrainConfig, train

    o = ctx.opts
    base = ctx.need_base()
    ctx.release()  # nothing of ours stays on the device: the peak is training's alone
    dataset, dataset_what = ctx.dataset()
    d = TrainConfig()
    # made here, not in train(), to time them; train() finds them cached
    made = _time_class_images(ctx, base, d) if checkpointing else None
    config = TrainConfig(
        base=str(base.path),
        steps=o.train_steps,
        num_class_images=o.class_images,
        class_image_steps=o.class_image_steps,
        resolution=o.resolution,
        progress=False,
        device=ctx.device,
        gradient_checkpointing=checkpointing,
        seed=o.seed,
    )
    steps: list[float] = []
    t0 = time.perf_counter()
    result = train(
        dataset,
        ctx.work / f"train-{int(checkpointing)}",
        config,
        base,
        on_step=lambda s: steps.append(s.seconds),
    )
    wall = time.perf_counter() - t0
    free_memory()
    timed = steps[WARMUP_STEPS:] or steps
    step = median(timed)
    setup = wall - sum(steps)  # model load, latents, LoRA injection, adapter save
    figures = {
        "step, median (after warm-up)": fig(round(step, 4), "s"),
        "first step": fig(round(steps[0], 3), "s"),
        f"projected {PROJECTED_STEPS} steps": fig(round(step * PROJECTED_STEPS / 60, 2), "min"),
        "peak memory": fig(
            round(result.peak_memory_bytes / 2**30, 2), "GiB", result.log["peak_memory_kind"]
        ),
        "precision": fig(result.log["precision"]),
        "optimizer": fig(
            result.optimizer,
            note="8-bit Adam asked for; bitsandbytes is not installed"
            if result.optimizer != "adamw8bit" and not _dist_version("bitsandbytes")
            else "",
        ),
        "setup (load, latents, LoRA, save)": fig(round(setup, 2), "s"),
        "final loss": fig(round(result.losses[-1], 5)),
    }
    out: dict[str, Any] = {
        "config": config.to_dict(),
        "deviations_from_defaults": {"steps": o.train_steps, "num_class_images": o.class_images}
        | ({} if o.resolution == d.resolution else {"resolution": o.resolution})
        | (
            {}
            if o.class_image_steps == d.class_image_steps
            else {"class_image_steps": o.class_image_steps}
        ),
        "dataset": dataset_what,
        "step_seconds": steps,
        "train_wall_s": wall,
        "log": {k: v for k, v in result.log.items() if k != "losses"},
        "figures": figures,
    }
    if made is not None and made["cached"]:
        out["class_images"] = made
        figures["class image, each"] = fig(None, "s", "cached by an earlier run: not timed")
    elif made is not None:
        out["class_images"] = made
        per_image, load = made["per_image_s"], made["pipeline_load_s"]
        job = setup + load + per_image * PROJECTED_CLASS_IMAGES + step * PROJECTED_STEPS
        figures["class image, each"] = fig(
            round(per_image, 3), "s", f"{o.class_images} made at {o.class_image_steps} steps"
        )
        figures[
            f"projected job ({PROJECTED_CLASS_IMAGES} class images, {PROJECTED_STEPS} steps)"
        ] = fig(round(job / 60, 2), "min", "setup + class images + steps")
    return out


def _time_class_images(ctx: Ctx, base, d) -> dict[str, float]:
    """Make the class images in two calls (1, then the rest), so the pipeline's load time and
    the time per image come apart: call 1 = load + 1 image, call 2 = load + (n - 1) images."""
    from avatarforge.paths import build_dir
    from avatarforge.train.class_images import cache_key, class_images

    o = ctx.opts
    n = o.class_images
    key = cache_key(
        base.content_hash, d.class_prompt, o.resolution, o.class_image_steps, d.class_image_guidance
    )
    if any((build_dir() / "class-images" / key).glob("*.png")):
        return {"count": n, "cached": True}  # an earlier run made (some of) them: not timed
    seconds = []
    for count in (1, n) if n >= 3 else (n,):
        t0 = time.perf_counter()
        class_images(
            base,
            d.class_prompt,
            count,
            o.resolution,
            steps=o.class_image_steps,
            guidance=d.class_image_guidance,
            device=ctx.device,
        )
        seconds.append(time.perf_counter() - t0)
    if len(seconds) == 2:
        per_image = (seconds[1] - seconds[0]) / (n - 2)
        load = max(seconds[0] - per_image, 0.0)
    else:  # too few to separate: the load counts as image time
        per_image, load = seconds[0] / n, 0.0
    return {
        "count": n,
        "cached": False,
        "calls_s": seconds,
        "per_image_s": per_image,
        "pipeline_load_s": load,
    }


def measure_training(ctx: Ctx) -> dict[str, Any]:
    return _measure_training(ctx, checkpointing=True)


def measure_training_no_checkpointing(ctx: Ctx) -> dict[str, Any]:
    return _measure_training(ctx, checkpointing=False)


class NotAvailable(Exception):
    """A measurement whose pieces are not on this machine (recorded as such, not a failure)."""


def triton_unavailable() -> str:
    """Why the local MME cannot run here ("" when it can)."""
    for module, dist in (("pytriton", "nvidia-pytriton"), ("tritonclient", "tritonclient[http]")):
        if importlib.util.find_spec(module) is None:
            return f"{dist} is not installed"
    try:
        from avatarforge.tritonserver.install import find_tritonserver

        find_tritonserver()
    except (FileNotFoundError, ImportError) as exc:
        return str(exc)
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        return f"numpy {numpy.__version__}: tritonserver 2.51's python stub needs numpy < 2"
    return ""


def measure_triton(ctx: Ctx) -> dict[str, Any]:
    """Cold and warm images through the local MME (tritonserver + SageMaker front end), against
    in-process generation with the same adapter."""
    if why := triton_unavailable():
        raise NotAvailable(why)
    from avatarforge.adapter import load_adapter, unload_adapter
    from avatarforge.generate import GenArgs, from_jpeg_base64, to_jpeg_base64
    from avatarforge.mme import MMEConfig, MultiModelLoader
    from avatarforge.mme.generate import generate_request, images_from_response
    from avatarforge.serving.config import ServingConfig, local_instance_env
    from avatarforge.serving.package import package_user
    from avatarforge.tritonserver.sagemaker import sagemaker_triton

    o = ctx.opts
    base = ctx.need_base()
    adapters = ctx.adapters()
    # the shared base's device is the instance's setting (AVATARFORGE_SERVING_DEVICE)
    serving = ServingConfig(device="cpu" if ctx.device == "cpu" else "auto")
    source = ctx.work / "mme-source"
    users = {}
    for user, folder in zip(("bench-a", "bench-b"), adapters, strict=True):
        package_user(user, folder, source, base=base)
        users[user] = f"{user}.tar.gz"
    args = GenArgs(steps=o.steps, height=o.size, width=o.size, seed=o.seed)
    request = generate_request(PROMPT, gen_args=args.to_dict())

    env = local_instance_env(base.path, ctx.work / "shared", serving=serving)
    pipe = ctx.pipeline()  # in process: the same adapter on the same base, for the ratio
    load_adapter(pipe, adapters[0], base, "bench")
    try:
        reference = _ours(pipe, args)
        with sagemaker_triton(ctx.work / "triton", extra_env=env, start_timeout=120) as server:
            loader = MultiModelLoader(
                server.sagemaker_url, str(source), ctx.work / "models", MMEConfig(max_loaded=4)
            )
            try:

                def invoke(target: str):
                    t0 = time.perf_counter()
                    (image,) = images_from_response(loader.invoke(target, request))
                    return image, time.perf_counter() - t0

                image_a, first_cold = invoke(users["bench-a"])  # also starts the shared base
                _, second_cold = invoke(users["bench-b"])
                invoke(users["bench-a"])  # warm-up of the warm path
                warm, local = [], []
                for _ in range(o.runs):  # interleaved, so drift hits both alike
                    warm.append(invoke(users["bench-a"])[1])
                    t0 = time.perf_counter()
                    _ours(pipe, args)
                    sync(ctx.device)
                    local.append(time.perf_counter() - t0)
            finally:
                loader.unload_all()
    finally:
        unload_adapter(pipe, "bench")
    local_s, warm_s = median(local), median(warm)
    jpeg_ref = from_jpeg_base64(to_jpeg_base64(reference))
    return {
        "server_start_s": server.start_seconds,
        "warm_seconds": warm,
        "local_seconds": local,
        "figures": {
            "first user's first image (starts the shared base)": fig(round(first_cold, 2), "s"),
            "a new user's first image (cold tarball -> image)": fig(round(second_cold, 2), "s"),
            "warm image through the MME, median": fig(round(warm_s, 4), "s"),
            "in-process generate_images, same adapter, median": fig(round(local_s, 4), "s"),
            "MME / in-process": fig(round(warm_s / local_s, 3), "x", "serving overhead"),
            "MME image vs in-process (JPEG both): max pixel diff": fig(
                max_pixel_diff(image_a, jpeg_ref), "/255"
            ),
        },
    }


# name -> function(ctx) -> {"figures": {...}, ...}; run in this order.
MEASUREMENTS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "base": measure_base,
    "generation": measure_generation,
    "adapters": measure_adapters,
    "batching": measure_batching,
    "training": measure_training,
    "training_no_checkpointing": measure_training_no_checkpointing,
    "triton": measure_triton,
}


# ---------------------------------------------------------------- the run


def run_one(ctx: Ctx, name: str, fn: Callable, estimate: float) -> dict[str, Any]:
    left = ctx.left()
    if estimate > left:
        return {
            "status": "skipped",
            "reason": f"needs ~{estimate:.0f} s, {max(left, 0):.0f} s left of --budget-s",
        }
    print(f"[gpu.py] {name} (~{estimate:.0f} s expected, {left:.0f} s of budget left)", flush=True)
    t0 = time.perf_counter()
    try:
        out = {"status": "ok", **fn(ctx)}
    except NotAvailable as exc:
        out = {"status": "not available", "reason": str(exc)}
    except Exception as exc:  # recorded; the other measurements still run
        if name == "base":
            ctx.base_error = f"{type(exc).__name__}: {exc}"
        out = {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-4000:],
        }
        print(out["traceback"], file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            ctx.release()  # the next measurement starts from a fresh pipeline, not a broken one
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def print_summary(env: dict[str, Any], results: dict[str, Any]) -> None:
    card = env.get("gpu") or f"CPU ({env['cpu_count']} cores)"
    v = env["versions"]
    print(
        f"\n{card}, driver {env.get('driver')}, CUDA {env.get('torch_cuda')}; torch "
        f"{v['torch']}, diffusers {v['diffusers']}, peft {v['peft']}, transformers "
        f"{v['transformers']}, python {env['python']}"
    )
    for name, r in results.items():
        status = r["status"]
        head = f"{name} [{status}, {r.get('seconds', 0):.0f} s]"
        if status != "ok":
            print(f"{head}: {r.get('reason') or r.get('error')}")
            continue
        print(head)
        for label, f in r.get("figures", {}).items():
            value = f["value"]
            note = f"  ({f['note']})" if f.get("note") else ""
            print(f"  {label:60} {value!s:>10} {f['unit']}{note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("--tiny", action="store_true", help="tiny base, CPU, 64 px: checks the script")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip what does not fit")
    p.add_argument("--only", default="", help=f"comma list of {', '.join(MEASUREMENTS)}")
    p.add_argument("--skip", default="", help="comma list of measurements to leave out")
    p.add_argument(
        "--clip-bpe",
        type=Path,
        help="bpe_simple_vocab_16e6.txt.gz where "
        "open-clip-torch is not installed (to build the full-size base's tokenizer)",
    )
    p.add_argument("--out-dir", type=Path, help="also copy the JSON here (e.g. $OUT)")
    p.add_argument("--seed", type=int, default=0)
    for name in PRESETS["gpu"]:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help="default: by mode")
    a = p.parse_args(argv)
    for names, flag in ((a.only, "--only"), (a.skip, "--skip")):
        unknown = {n for n in names.split(",") if n} - set(MEASUREMENTS)
        if unknown:
            p.error(f"{flag}: unknown measurement(s) {', '.join(sorted(unknown))}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # without PYTHONPATH
    import torch

    from avatarforge.base.logs import quiet_hf
    from avatarforge.paths import build_dir

    quiet_hf()
    # diffusers loads a second adapter into a model that has one: expected here, not news
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    mode = "tiny" if a.tiny else ("gpu" if device == "cuda" else "cpu")
    for key, value in PRESETS[mode].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if mode != "tiny" and "base" not in a.skip.split(","):
        from avatarforge.fullsize import full_base_dir

        cached = (full_base_dir() / "model_index.json").is_file()
        if not cached and a.clip_bpe is None and importlib.util.find_spec("open_clip") is None:
            print(
                "error: open-clip-torch is not installed and the full-size base is not built: "
                "pass --clip-bpe PATH/bpe_simple_vocab_16e6.txt.gz",
                file=sys.stderr,
            )
            return 2
        if a.clip_bpe is not None and not a.clip_bpe.is_file():
            print(f"error: --clip-bpe {a.clip_bpe}: no such file", file=sys.stderr)
            return 2
    selected = [n for n in MEASUREMENTS if (not a.only or n in a.only.split(","))]
    selected = [n for n in selected if n not in a.skip.split(",")]
    if any(n != "base" for n in selected) and "base" not in selected:
        selected.insert(0, "base")  # everything else needs it

    env = environment(device)
    print(
        f"[gpu.py] mode {mode}, device {device} ({env.get('gpu', 'cpu')}), "
        f"budget {a.budget_s:.0f} s",
        flush=True,
    )
    work_root = build_dir() / "bench"
    work_root.mkdir(parents=True, exist_ok=True)
    name = "gpu" if mode == "gpu" else f"gpu-{mode}"
    results: dict[str, Any] = {}
    record_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}

    def save() -> None:
        payload = {
            "mode": mode,
            "environment": env,
            "measurements": results,
            "total_s": round(time.perf_counter() - t_start, 1),
        }
        dest = write_results(name, record_args, payload)
        if a.out_dir is not None:
            a.out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dest, a.out_dir / dest.name)

    with tempfile.TemporaryDirectory(prefix="gpu-work-", dir=work_root) as tmp:
        ctx = Ctx(a, mode, device, Path(tmp), t_start + a.budget_s)
        try:
            for key, fn in MEASUREMENTS.items():
                if key not in selected:
                    continue
                results[key] = run_one(ctx, key, fn, ESTIMATES_S[mode][key])
                save()
        finally:
            ctx.release()
            save()
    print_summary(env, results)
    failed = [k for k, r in results.items() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
