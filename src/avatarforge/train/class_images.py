"""Prior-preservation class images, generated with the base and shared between users.

Cached under ``build_dir()/class-images/<key>/`` where the key hashes (base hash, prompt,
resolution, sampler settings). Image ``i`` is generated with seed ``i``, so the folder only grows:
a user asking for 50 images after another asked for 20 pays for 30, and a second user asking for
the same count pays nothing. Each file is written atomically; a file lock keeps two training
jobs on one machine from generating the same images twice. Generation shows a progress bar
(``progress``); stopped part-way, the images made so far stay cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..base.identity import BaseInfo
from ..paths import build_dir

log = logging.getLogger(__name__)

GPU_BATCH = 8  # class images per pipeline call on a GPU (SD 2.1 at 512 px: a few GiB)


def cache_key(base_hash: str, prompt: str, resolution: int, steps: int, guidance: float) -> str:
    blob = json.dumps([base_hash, prompt, resolution, steps, float(guidance)])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_dir(
    base: BaseInfo,
    prompt: str,
    resolution: int,
    *,
    steps: int = 25,
    guidance: float = 7.5,
    cache_root: Path | None = None,
) -> Path:
    """The folder that holds (or will hold) these class images."""
    key = cache_key(base.content_hash, prompt, resolution, steps, guidance)
    return (cache_root or build_dir() / "class-images") / key


def missing_count(count: int, folder: Path) -> int:
    """How many of the first ``count`` class images ``folder`` lacks (what is left to make)."""
    return sum(1 for i in range(count) if not (folder / f"{i:05d}.png").is_file())


def class_images(
    base: BaseInfo,
    prompt: str,
    count: int,
    resolution: int,
    *,
    steps: int = 25,
    guidance: float = 7.5,
    device: str | None = None,
    cache_root: Path | None = None,
    progress: bool = False,
    per_call: int | None = None,
) -> list[Path]:
    """``count`` class images of ``prompt`` made by ``base`` at ``resolution``, cached;
    ``progress`` shows a bar while missing ones are made. ``per_call``: images per pipeline
    call (default: 8 on a GPU, 1 on a CPU)."""
    from filelock import FileLock

    root = cache_dir(
        base, prompt, resolution, steps=steps, guidance=guidance, cache_root=cache_root
    )
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"{i:05d}.png" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if not missing:
        return paths
    with FileLock(str(root / ".lock")):
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        if missing:
            _generate(base, prompt, resolution, steps, guidance, device, progress, root, missing,
                      per_call)  # fmt: skip
            (root / "info.json").write_text(
                json.dumps(
                    {
                        "base_id": base.base_id,
                        "base_hash": base.content_hash,
                        "prompt": prompt,
                        "resolution": resolution,
                        "steps": steps,
                        "guidance": guidance,
                        "seeds": "image i uses seed i",
                    },
                    indent=2,
                )
                + "\n"
            )
    return paths


def _generate(
    base, prompt, resolution, steps, guidance, device, progress: bool, root: Path, indices,
    per_call: int | None,
) -> None:  # fmt: skip
    import torch
    from tqdm.auto import tqdm

    from ..base.pipeline import load_pipeline
    from ..generate import GenArgs, generate_batch, generate_images

    log.info("generating %d class images of %r at %d px", len(indices), prompt, resolution)
    bar = tqdm(total=len(indices), disable=not progress, desc="class images", unit="image")
    pipe = load_pipeline(base, device=device)
    # on a GPU several images per pipeline call (one UNet batch): image i keeps seed i, and its
    # pixels equal a call of its own up to float rounding; on a CPU one at a time, as before
    per_call = per_call or (GPU_BATCH if pipe.unet.device.type == "cuda" else 1)
    tmp = None
    try:
        for start in range(0, len(indices), per_call):
            chunk = indices[start : start + per_call]
            rows = [
                (prompt, None, GenArgs(steps=steps, guidance_scale=guidance, seed=i,
                                       height=resolution, width=resolution))
                for i in chunk
            ]  # fmt: skip
            if len(rows) == 1:
                images = [generate_images(pipe, prompt, None, rows[0][2])[0]]
            else:
                images = [row[0] for row in generate_batch(pipe, rows)]
            for i, image in zip(chunk, images, strict=True):
                tmp = root / f".{i:05d}.{os.getpid()}.png"
                image.save(tmp)
                os.replace(tmp, root / f"{i:05d}.png")
                bar.update(1)
    finally:
        bar.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # an image interrupted while being written
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
