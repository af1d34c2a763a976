"""Peak memory and step time of the trainer on this device, side by side in one run.

    python bench/train_memory.py [--resolution 512] [--rank 8] [--steps 4] [--base tiny]

Each variant trains in its own subprocess (peak RSS is per process), on the same dataset and
base; prints a table with ratios to the first variant and writes build/bench/train_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import write_results

VARIANTS = {
    "default": {},
    "no cached latents": {"cache_latents": False},
    "no grad checkpointing": {"gradient_checkpointing": False},
    "frozen text encoder": {"train_text_encoder": False},
}


def _child(dataset: str, out: str, config: str) -> None:
    from avatarforge.train import TrainConfig, train

    r = train(Path(dataset), Path(out), TrainConfig(**json.loads(config)))
    size = r.log["adapter_bytes"]
    print(json.dumps({"peak": r.peak_memory_bytes, "step_s": r.step_seconds, "bytes": size}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--base", default="tiny")
    a = p.parse_args()
    from avatarforge.testing.datasets import write_dataset

    common = {"resolution": a.resolution, "steps": a.steps, "unet_rank": a.rank,
              "text_encoder_rank": a.rank, "num_class_images": 4, "class_image_steps": 2,
              "base": a.base, "progress": False, "checkpoint_every": 10_000}  # fmt: skip
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_dataset(Path(tmp) / "ds")
        for name, change in VARIANTS.items():
            cfg = json.dumps(common | change)
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(dataset), f"{tmp}/{len(rows)}", cfg],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    first = next(iter(rows.values()))
    head = ("variant", "peak MiB", "ratio", "step s", "ratio", "adapter KiB")
    print("{:24} {:>9} {:>6} {:>7} {:>6} {:>11}".format(*head))
    for name, r in rows.items():
        peak, step = r["peak"], r["step_s"]
        print(
            f"{name:24} {peak / 2**20:9.0f} {peak / first['peak']:6.2f} {step:7.3f} "
            f"{step / first['step_s']:6.2f} {r['bytes'] / 1024:11.1f}"
        )
    write_results("train_memory", vars(a), rows)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
    else:
        main()
