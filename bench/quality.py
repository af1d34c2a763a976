"""Which training settings give better avatars: eval scores and adapter size, side by side.

    python bench/quality.py --base /models/stable-diffusion-2-1-base --dataset build/datasets/alice
    python bench/quality.py --tiny     # the same code path on the tiny base, CPU, about a minute

Each variant trains an adapter on the same photos (``--dataset``: a folder `avatarforge
preprocess` wrote of a real person) and the same real SD 2.1 base, then `avatarforge eval`
scores it with the same fixed prompt set: identity (the share of token images that are the
person), leakage (the share of class-prompt faces that are the person: lower is better), face
found, and the adapter's size. Variants change one thing from the defaults each (rank, steps,
text encoder, prior preservation); ``--only`` picks some.

It needs real weights and a GPU: without CUDA or without ``--base`` it says what it could not do,
writes that to build/bench/quality.json and exits 0. ``--tiny`` runs the path on the tiny random
base, whose scores measure nothing (the report says so): it checks the script, not the settings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import write_results


def _rank(r: int) -> dict[str, Any]:
    return {"unet_rank": r, "unet_alpha": float(r), "text_encoder_rank": r,
            "text_encoder_alpha": float(r)}  # fmt: skip


VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "rank-4": _rank(4),
    "rank-16": _rank(16),
    "half-steps": {"steps": "half"},
    "text-encoder-off": {"train_text_encoder": False},
    "prior-preservation-off": {"prior_preservation": False},
}
# the TrainConfig fields a row of the table records
TRAIN_FIELDS = ("steps", "resolution", "unet_rank", "text_encoder_rank", "train_text_encoder",
                "prior_preservation")  # fmt: skip

# --tiny: the tiny base on the CPU, small enough for a test
TINY_TRAIN = {"resolution": 64, "steps": 4, "learning_rate": 1e-2, "num_class_images": 2,
              "class_image_steps": 2, "gradient_checkpointing": False, "progress": False,
              "checkpoint_every": 10_000, "device": "cpu"}  # fmt: skip
TINY_EVAL = {"prompts": 1, "seeds": 1, "steps": 2, "size": 64, "max_references": 4, "device": "cpu"}


def what_is_missing(a: argparse.Namespace) -> list[str]:
    """Why a real comparison cannot run here (empty: it can)."""
    if a.tiny:
        return []
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append(
            "no CUDA device (torch sees none): training SD 2.1 at 512 px takes hours per "
            "variant on a CPU"
        )
    if not a.base:
        missing.append(
            "no --base: give a real SD 2.1 diffusers folder (the tiny and full-size random "
            "bases make no faces, so their scores measure nothing)"
        )
    if not a.dataset:
        missing.append("no --dataset: give a preprocessed folder of a real person's photos")
    return missing


def variant_config(name: str, a: argparse.Namespace):
    from avatarforge.train import TrainConfig

    change = dict(VARIANTS[name])
    steps = TINY_TRAIN["steps"] if a.tiny else a.steps
    if change.get("steps") == "half":
        change["steps"] = max(1, steps // 2)
    common = {**TINY_TRAIN, "base": "tiny"} if a.tiny else {"base": a.base, "steps": steps}
    return TrainConfig(**{**common, "steps": steps, **change, "progress": a.tiny is False})


def run_variant(name: str, a, dataset: Path, work: Path, base) -> dict[str, Any]:
    from avatarforge.quality import EvalConfig, evaluate
    from avatarforge.train import train

    config = variant_config(name, a)
    started = time.perf_counter()
    result = train(dataset, work / name, config, base)
    trained_s = time.perf_counter() - started
    size = sum(f.stat().st_size for f in result.adapter_dir.iterdir() if f.is_file())
    eval_config = EvalConfig(**TINY_EVAL) if a.tiny else EvalConfig(prompts=a.eval_prompts,
                                                                    seeds=a.eval_seeds)  # fmt: skip
    out = Path(a.out_dir) / "quality" / name
    scored = evaluate(name, result.adapter_dir, dataset, out, eval_config, base=base)
    s = scored.report.scores
    return {
        "status": "ok",
        "train": {k: v for k, v in config.to_dict().items() if k in TRAIN_FIELDS},
        "train_seconds": round(trained_s, 1),
        "adapter_bytes": size,
        "face_found_rate": s["face_found_rate"],
        "identity_match_rate": s["identity"]["match_rate"],
        "identity_mean_distance": s["identity"]["mean_distance"],
        "leak_rate": s["leakage"]["leak_rate"],
        "leak_min_distance": s["leakage"]["min_distance"],
        "measures_nothing": scored.report.measures_nothing,
        "report": str(scored.report_path),
        "grid": str(scored.grid_path),
    }


def _cell(value, fmt: str, width: int) -> str:
    return f"{'n/a' if value is None else format(value, fmt):>{width}}"


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    head = ("variant", "identity", "mean d", "leak", "face", "adapter KiB", "train s")
    print("{:24} {:>8} {:>7} {:>6} {:>6} {:>11} {:>8}".format(*head))
    for name, r in rows.items():
        if r["status"] != "ok":
            print(f"{name:24} {r['status']}: {r.get('error', '')}")
            continue
        print(
            f"{name:24} {_cell(r['identity_match_rate'], '.0%', 8)} "
            f"{_cell(r['identity_mean_distance'], '.3f', 7)} {_cell(r['leak_rate'], '.0%', 6)} "
            f"{_cell(r['face_found_rate'], '.0%', 6)} {r['adapter_bytes'] / 1024:11.1f} "
            f"{r['train_seconds']:8.1f}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="a real SD 2.1 diffusers folder (the one you serve)")
    p.add_argument("--dataset", help="a preprocessed folder of a real person's photos")
    p.add_argument("--steps", type=int, default=800, help="training steps of the default variant")
    p.add_argument("--only", help=f"comma-separated variants of: {', '.join(VARIANTS)}")
    p.add_argument("--eval-prompts", type=int, default=4, help="eval prompt templates")
    p.add_argument("--eval-seeds", type=int, default=2, help="eval seeds per template")
    p.add_argument("--tiny", action="store_true", help="tiny base, CPU: checks the script")
    p.add_argument("--out-dir", default="", help="where eval reports go (default: build/bench)")
    a = p.parse_args()
    from avatarforge.paths import build_dir

    a.out_dir = a.out_dir or str(build_dir() / "bench")
    names = a.only.split(",") if a.only else list(VARIANTS)
    if unknown := [n for n in names if n not in VARIANTS]:
        p.error(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    missing = what_is_missing(a)
    args = {k: v for k, v in vars(a).items()}
    if missing:
        print("bench/quality.py compares training settings by eval scores; it did not run here:")
        for reason in missing:
            print(f"  - {reason}")
        print(f"  variants it would train and score: {', '.join(names)}")
        print("  (python bench/quality.py --tiny runs the same path on the tiny base, CPU)")
        write_results("quality", args, {"status": "skipped", "reasons": missing,
                                        "variants": {n: VARIANTS[n] for n in names}})  # fmt: skip
        return 0

    from avatarforge.base.config import BaseConfig, resolve_base

    base = resolve_base(BaseConfig() if a.tiny else BaseConfig(base=a.base))
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(a.dataset) if a.dataset and not a.tiny else None
        if dataset is None:
            from avatarforge.testing.datasets import write_dataset

            dataset = write_dataset(Path(tmp) / "dataset")
        for name in names:
            print(f"{name}: training and scoring...", flush=True)
            try:
                rows[name] = run_variant(name, a, dataset, Path(tmp) / "runs", base)
            except Exception as exc:  # one failed variant is recorded; the others still run
                rows[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            write_results("quality", args, {"status": "partial", "base": base.base_id,
                                            "variants": rows})  # fmt: skip
    print_table(rows)
    nothing = any(r.get("measures_nothing") for r in rows.values())
    if nothing:
        print(f"note: {base.base_id} has random weights: these scores measure nothing")
    write_results("quality", args, {"status": "ok", "base": base.base_id,
                                    "measures_nothing": nothing, "variants": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
