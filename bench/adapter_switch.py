"""Adapter activation at full SD 2.1 size, and cross-user batching, side by side on this CPU.

    python bench/adapter_switch.py [--part switch,batching] [--adapters 12] [--switches 6]
                                   [--users 16] [--requests 32] [--size 64] [--steps 10]

switch (full size: fullsize.full_components on the CPU in fp32, default-rank adapters from
fullsize.random_adapter; the work is memory and module surgery, so CPU figures count):
  (a) today: AdapterCache, capacity 1 (unload + load_lora_weights) and capacity N (every user
      loaded, switched with set_adapters)
  (b) slots, cold: read from the adapter folder into one preallocated LoRA slot (no host cache)
  (c) slots, host cache: copied from host memory into one slot
  (d) slots, resident: both adapters in slots; a switch only changes what the hooks apply
  exactness: one UNet and text encoder forward with the slot path vs today's path (max |diff|)
  memory: RSS after 1 and after N adapters, per path (today keeps each loaded adapter in the
  model, i.e. in GPU memory on a GPU; the slots keep a fixed size and the host cache grows)

batching (tiny base): requests spread over --users users (one adapter each), handed to the
shared base in Triton batches of 8 requests, batched (one UNet batch per execute, a LoRA per
row) vs one row at a time (ServingConfig.batching off); images/s and the max pixel difference.

Prints a table and writes build/bench/adapter_switch.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _results import write_results

PROMPT = "a photo of <<TOK>> person"
MIB = 2**20


def _rss() -> int:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- switch (full size)


def _full_pipeline(work: Path):
    """SD 2.1-base with random weights on the CPU (fp32), and a config-only base folder for
    random_adapter (it reads the UNet and text encoder configs, never weights)."""
    import hashlib

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from avatarforge.base.config import BaseConfig, resolve_base
    from avatarforge.base.identity import BaseInfo
    from avatarforge.fullsize import FULL_ID_PREFIX, full_components

    components = full_components(seed=0, device="cpu")
    tiny = resolve_base(BaseConfig())  # its tokenizer: activation never tokenizes
    tokenizer = CLIPTokenizer.from_pretrained(tiny.path, subfolder="tokenizer")
    no_checker = {"safety_checker": None, "feature_extractor": None}
    pipe = StableDiffusionPipeline(
        **components, **no_checker, tokenizer=tokenizer, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    folder = work / "base"
    pipe.unet.save_config(folder / "unet")
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    configs = b"".join(p.read_bytes() for p in sorted(folder.rglob("*.json")))
    base = BaseInfo(f"{FULL_ID_PREFIX}@seed0", hashlib.sha256(configs).hexdigest(), folder)
    return pipe, base


def _forward(pipe):
    """One text encoder + UNet forward at an 8x8 latent: compares paths without a whole image."""
    import torch

    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        text = pipe.text_encoder(ids.input_ids)[0]
        g = torch.Generator().manual_seed(0)
        latents = torch.randn((1, 4, 8, 8), generator=g)
        return text, pipe.unet(latents, 500, encoder_hidden_states=text).sample


def _paths(pipe, base, users: int):
    """name -> (make() -> activate(folder), close(), memory() -> bytes the path holds)."""
    from avatarforge.serving.adapter_cache import AdapterCache, SlotAdapterCache

    def today(capacity):
        def make():
            cache = AdapterCache(pipe, base, capacity=capacity)
            return (lambda f: cache.activate(str(f))), cache.clear, None

        return make

    def slots(count, cache_bytes):
        def make():
            cache = SlotAdapterCache(pipe, base, slots=count, host_cache_bytes=cache_bytes)
            return (lambda f: cache.activate(str(f))), cache.clear, cache.memory

        return make

    return {
        "(a) today, capacity 1 (unload + load_lora_weights)": today(1),
        f"(a) today, capacity {users} (set_adapters)": today(users),
        "(b) slots, cold from disk (1 slot, no host cache)": slots(1, 0),
        "(c) slots, from the host cache (1 slot)": slots(1, 2**40),
        "(d) slots, resident (8 slots)": slots(8, 2**40),
    }


def bench_switch(a, work: Path) -> dict:
    import torch

    from avatarforge.adapter import WEIGHTS_FILE
    from avatarforge.fullsize import random_adapter
    from avatarforge.serving.adapter_cache import AdapterCache

    t0 = time.perf_counter()
    pipe, base = _full_pipeline(work)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    folders = [random_adapter(base, work / f"user{i}", seed=i) for i in range(a.adapters)]
    make_s = (time.perf_counter() - t0) / a.adapters
    size = (folders[0] / WEIGHTS_FILE).stat().st_size
    _, bare_unet = _forward(pipe)

    reference = AdapterCache(pipe, base, capacity=1)  # today's path is the reference
    reference.activate(str(folders[0]))
    ref_text, ref_unet = _forward(pipe)
    reference.clear()

    rows: dict[str, dict] = {}
    for name, make in _paths(pipe, base, max(2, a.adapters)).items():
        print(f"[adapter_switch] {name}", flush=True)
        activate, close, memory = make()
        try:
            rss0 = _rss()
            t0 = time.perf_counter()
            activate(folders[0])
            first = time.perf_counter() - t0
            text, unet = _forward(pipe)
            exact = max((text - ref_text).abs().max().item(), (unet - ref_unet).abs().max().item())
            rss1 = _rss()
            switches = []
            for i in range(a.switches + 1):  # alternate two users; the first is a warm-up
                t0 = time.perf_counter()
                activate(folders[(i + 1) % 2])
                switches.append(time.perf_counter() - t0)
            row = {
                "first activation (cold) s": first,
                "switch, median s": _median(switches[1:]),
                "max abs diff vs today": exact,
                "RSS after 1 adapter MiB": (rss1 - rss0) / MIB,
            }
            if not name.startswith("(a) today, capacity 1 "):  # memory after N distinct users
                for folder in folders:
                    activate(folder)
                rssn = _rss()
                row["RSS after N adapters MiB"] = (rssn - rss0) / MIB
                row["RSS per added adapter MiB"] = (rssn - rss1) / MIB / (len(folders) - 1)
            if memory is not None:
                row |= {f"{k} (after N)": v for k, v in memory().items()}
            rows[name] = row
        finally:
            close()
    changed = (ref_unet - bare_unet).abs().max().item()
    return {
        "base": "SD 2.1-base architecture, random weights, fp32 on the CPU",
        "threads": torch.get_num_threads(),
        "adapter_file_mib": size / MIB,
        "adapters": a.adapters,
        "build_pipeline_s": build_s,
        "make_adapter_s": make_s,
        "adapter changes the UNet output by (max |diff|)": changed,
        "paths": rows,
    }


# ---------------------------------------------------------------- batching (tiny base)


def _request(prompt: str, adapter: str, gen_args: dict):
    import numpy as np

    def column(value: str):
        return np.array([[value.encode()]], dtype=object)

    return {
        "prompt": column(prompt),
        "gen_args": column(json.dumps(gen_args)),
        "adapter": column(adapter),
    }


def _max_diff(a, b) -> int:
    import numpy as np

    pa, pb = (np.asarray(x.convert("RGB"), dtype=np.int16) for x in (a, b))
    return int(np.abs(pa - pb).max())


def bench_batching(a, work: Path) -> dict:
    from avatarforge.base.config import BaseConfig, resolve_base
    from avatarforge.base.pipeline import load_pipeline
    from avatarforge.fullsize import random_adapter
    from avatarforge.generate import GenArgs, from_jpeg_base64
    from avatarforge.serving.handler import Job, Row
    from avatarforge.serving.shared_base import SharedBase

    base = resolve_base(BaseConfig())
    users = [
        str(random_adapter(base, work / f"tiny-user{i}", seed=100 + i, weight_std=0.05))
        for i in range(a.users)
    ]
    args = [GenArgs(seed=i, steps=a.steps, height=a.size, width=a.size) for i in range(a.requests)]
    requests = [_request(PROMPT, users[i % a.users], args[i].to_dict()) for i in range(a.requests)]
    triton_batches = [requests[i : i + 8] for i in range(0, len(requests), 8)]  # max_batch_size
    shared = SharedBase(load_pipeline(base, device="cpu"), base, batch_max_images=8)

    def serve(batching: bool):
        shared.batching = batching
        t0 = time.perf_counter()
        out = [r for batch in triton_batches for r in shared.handle(batch)]
        return out, time.perf_counter() - t0

    serve(True)  # warm-up: adapters read into the host cache, allocator warm
    serve(False)
    times: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    for _ in range(a.runs):  # interleaved, so that load on this machine hits both alike
        for batching in (True, False):
            outputs[batching], seconds = serve(batching)
            times[batching].append(seconds)
    jpeg_diff = max(
        _max_diff(from_jpeg_base64(b[0][0]), from_jpeg_base64(s[0][0]))
        for b, s in zip(outputs[True], outputs[False], strict=True)
    )
    batched, alone = _median(times[True]), _median(times[False])
    # the same rows before JPEG: the first Triton batch as one call vs row by row
    jobs = [Job(i, 0, Row(PROMPT, None, args[i]), users[i % a.users]) for i in range(8)]
    together = [images[0] for images in shared.generate_jobs(jobs)]
    each = [shared.generate_jobs([job])[0][0] for job in jobs]
    raw = max(_max_diff(x, y) for x, y in zip(together, each, strict=True))
    return {
        "base": "tiny",
        "users": a.users,
        "requests": a.requests,
        "workload": f"{a.size}x{a.size}, {a.steps} DDIM steps, guidance 7.5, 1 image/request, "
        f"Triton batches of 8 requests",
        "batched s": times[True],
        "one at a time s": times[False],
        "batched images/s": a.requests / batched,
        "one at a time images/s": a.requests / alone,
        "speedup": alone / batched,
        "max pixel diff (JPEG decoded), batched vs one at a time": jpeg_diff,
        "max pixel diff, batched vs alone": raw,
    }


# ---------------------------------------------------------------- report


def _print(results: dict) -> None:
    if "switch" in results:
        s = results["switch"]
        print(
            f"\nadapter activation, full-size SD 2.1 on the CPU (fp32, {s['threads']} threads), "
            f"default-rank adapter {s['adapter_file_mib']:.2f} MiB, {s['adapters']} users"
        )
        print(f"{'path':54} {'first s':>8} {'switch s':>9} {'|diff|':>7} {'MiB/user':>9}")
        for name, row in s["paths"].items():
            first, switch = row["first activation (cold) s"], row["switch, median s"]
            diff, per = row["max abs diff vs today"], row.get("RSS per added adapter MiB")
            if row.get("host_cache_adapters (after N)"):  # exact: what the host cache holds
                per = row["host_cache_bytes (after N)"] / MIB / row["host_cache_adapters (after N)"]
            elif "slot_bytes (after N)" in row:
                per = 0.0  # nothing kept per user
            per_text = "" if per is None else f"{per:9.2f}"
            print(f"{name:54} {first:8.3f} {switch:9.4f} {diff:7.1g} {per_text}")
        print(
            "  MiB/user: today, RSS growth per loaded user (GPU memory on a GPU); slots, the "
            "host cache per user (exact); the slots' own memory is fixed:"
        )
        for name, row in s["paths"].items():
            if "slot_bytes (after N)" in row:
                slots, host = row["slot_bytes (after N)"], row["host_cache_bytes (after N)"]
                count = row["host_cache_adapters (after N)"]
                print(
                    f"  {name}: slots {slots / MIB:.1f} MiB (fixed), host cache "
                    f"{host / MIB:.1f} MiB for {count} adapters"
                )
    if "batching" in results:
        b = results["batching"]
        print(
            f"\ncross-user batching, tiny base, {b['requests']} requests over {b['users']} users "
            f"({b['workload']})"
        )
        print(f"  one at a time {b['one at a time images/s']:8.2f} images/s")
        print(f"  batched       {b['batched images/s']:8.2f} images/s  ({b['speedup']:.2f}x)")
        print(
            f"  max pixel diff, batched vs alone: {b['max pixel diff, batched vs alone']} "
            f"(raw), {b['max pixel diff (JPEG decoded), batched vs one at a time']} (JPEG)"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("--part", default="switch,batching", help="comma list: switch, batching")
    p.add_argument("--adapters", type=int, default=12, help="distinct users (switch)")
    p.add_argument("--switches", type=int, default=6, help="timed switches per path")
    p.add_argument("--users", type=int, default=16, help="users (batching)")
    p.add_argument("--requests", type=int, default=32, help="requests, >= 8 (batching)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (batching)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps (batching)")
    p.add_argument("--runs", type=int, default=2, help="timed runs per mode (batching)")
    a = p.parse_args(argv)
    parts = [x for x in a.part.split(",") if x]
    if unknown := set(parts) - {"switch", "batching"}:
        p.error(f"--part: unknown {', '.join(sorted(unknown))}")
    if a.requests < 8 or a.adapters < 2:
        p.error("--requests must be >= 8 and --adapters >= 2")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from avatarforge.base.logs import quiet_hf
    from avatarforge.paths import build_dir

    quiet_hf()
    results: dict = {}
    (build_dir() / "bench").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="adapter-switch-", dir=build_dir() / "bench") as tmp:
        if "batching" in parts:
            results["batching"] = bench_batching(a, Path(tmp))
        if "switch" in parts:
            results["switch"] = bench_switch(a, Path(tmp))
    _print(results)
    write_results("adapter_switch", vars(a), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
