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
) -> list[Path]:
    """``count`` class images of ``prompt`` made by ``base`` at ``resolution``, cached;
    ``progress`` shows a bar while missing ones are made."""
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
            _generate(base, prompt, resolution, steps, guidance, device, progress, root, missing)
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
    base, prompt, resolution, steps, guidance, device, progress: bool, root: Path, indices
) -> None:
    import torch
    from tqdm.auto import tqdm

    from ..base.pipeline import load_pipeline
    from ..generate import GenArgs, generate_images

    log.info("generating %d class images of %r at %d px", len(indices), prompt, resolution)
    bar = tqdm(total=len(indices), disable=not progress, desc="class images", unit="image")
    pipe = load_pipeline(base, device=device)
    tmp = None
    try:
        for i in indices:
            args = GenArgs(
                steps=steps, guidance_scale=guidance, seed=i, height=resolution, width=resolution
            )
            (image,) = generate_images(pipe, prompt, None, args)
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
