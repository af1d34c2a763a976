"""Users per machine: a whole pipeline per user (the reference implementation) against one
shared base with per-user LoRA adapters switched per request (avatarforge), side by side.

    python bench/serving_density.py [--users 6] [--base tiny] [--size 64] [--steps 2]

Each design runs in its own subprocess (memory is per process): for every new user it times
the cold start (load + first image) and the memory it adds, then times warm requests that
alternate between users. Prints ratios and writes build/bench/serving_density.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_results


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _child(design: str, adapters: list[str], base_spec: str, size: int, steps: int) -> dict:
    from avatarforge.adapter import load_adapter
    from avatarforge.base.config import BaseConfig, resolve_base
    from avatarforge.base.pipeline import load_pipeline
    from avatarforge.generate import GenArgs, generate_images
    from avatarforge.serving.adapter_cache import AdapterCache

    base = resolve_base(BaseConfig(base=base_spec))
    args = GenArgs(steps=steps, height=size, width=size)
    prompt = "a photo of <<TOK>> person"
    start_rss = _rss()
    cache = (
        AdapterCache(load_pipeline(base), base, capacity=len(adapters))
        if design == "shared"
        else None
    )
    pipes = {}

    def pipe_for(folder: str):
        """The pipeline that serves ``folder``'s user (made on the user's first request)."""
        if cache is not None:
            cache.activate(folder)
            return cache.pipe
        if folder not in pipes:
            pipe = load_pipeline(base)
            load_adapter(pipe, Path(folder), base, f"user{len(pipes)}")
            pipes[folder] = pipe
        return pipes[folder]

    cold, added = [], []
    for folder in adapters:
        before, t = _rss(), time.perf_counter()
        generate_images(pipe_for(folder), prompt, None, args)
        cold.append(time.perf_counter() - t)
        added.append(_rss() - before)
    warm = []
    for folder in adapters * 2:  # alternate users: the shared design switches adapters
        t = time.perf_counter()
        generate_images(pipe_for(folder), prompt, None, args)
        warm.append(time.perf_counter() - t)
    return {
        "cold_s": cold,
        "added_bytes": added,
        "total_bytes": _rss() - start_rss,
        "warm_s_median": sorted(warm)[len(warm) // 2],
    }


def _make_adapters(tmp: Path, users: int, base_spec: str) -> list[str]:
    """One short real training run, copied per user (loading is what is measured)."""
    from avatarforge.testing.datasets import write_dataset
    from avatarforge.train import TrainConfig, train

    config = TrainConfig(
        base=base_spec, resolution=64, steps=4, num_class_images=2, class_image_steps=2,
        progress=False,
    )  # fmt: skip
    result = train(write_dataset(tmp / "ds"), tmp / "run", config)
    folders = []
    for i in range(users):
        folder = tmp / f"user{i}"
        shutil.copytree(result.adapter_dir, folder)
        folders.append(str(folder))
    return folders


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=6)
    p.add_argument("--base", default="tiny")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--steps", type=int, default=2, help="denoising steps per image")
    a = p.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = _make_adapters(Path(tmp), a.users, a.base)
        for design in ("per-user pipeline", "shared"):
            spec = json.dumps([design, adapters, a.base, a.size, a.steps])
            out = subprocess.run(
                [sys.executable, __file__, "--child", spec],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results[design] = json.loads(out.stdout.strip().splitlines()[-1])
    ref, ours = results["per-user pipeline"], results["shared"]

    def per_user(values):  # mean over the users after the first (the first pays for the base)
        rest = values[1:] or values
        return sum(rest) / len(rest)

    print(f"{a.users} users, base {a.base!r}, {a.size}px, {a.steps} steps")
    print(f"{'':28} {'per-user pipeline':>18} {'shared base':>12} {'ratio':>7}")
    rows = [
        ("cold start per user (s)", per_user(ref["cold_s"]), per_user(ours["cold_s"])),
        (
            "memory per user (MiB)",
            per_user(ref["added_bytes"]) / 2**20,
            per_user(ours["added_bytes"]) / 2**20,
        ),
        ("warm request, median (s)", ref["warm_s_median"], ours["warm_s_median"]),
    ]
    for name, r, o in rows:
        print(f"{name:28} {r:18.3f} {o:12.3f} {r / o if o else float('inf'):7.1f}")
    write_results("serving_density", vars(a), results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(*json.loads(sys.argv[2]))))
    else:
        main()
