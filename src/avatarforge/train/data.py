"""Training data: the user's kept photos, the class images, their latents and prompt tokens.

Images are encoded by the VAE once (``cache_latents``): the cached tensors are the latent
distribution's parameters, and a latent is sampled from them each step with the step's seeded
generator — exactly what encoding every step would do, without the VAE in memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import TrainingError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1  # avatarforge.preprocess.manifest.VERSION (not imported: no cv2 needed here)


@dataclass(frozen=True)
class InstanceSet:
    """The user's photos to train on and the hash of the manifest that listed them."""

    images: tuple[Path, ...]
    dataset_hash: str


def read_dataset(dataset_dir: Path) -> InstanceSet:
    """The kept images of a preprocessed dataset (dataset_dir/manifest.json, version 1)."""
    dataset_dir = Path(dataset_dir)
    manifest = dataset_dir / MANIFEST
    if not manifest.is_file():
        raise TrainingError(f"{dataset_dir} is not a preprocessed dataset: {MANIFEST} is missing")
    raw = manifest.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrainingError(f"{manifest} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("items"), list):
        raise TrainingError(f"{manifest}: expected an object with an 'items' list")
    if data.get("version") != MANIFEST_VERSION:
        raise TrainingError(
            f"{manifest}: manifest version {data.get('version')!r}, expected {MANIFEST_VERSION}"
        )
    _refuse_unfinished(dataset_dir, data)
    images = []
    for item in data["items"]:
        if not isinstance(item, dict) or item.get("status") != "kept":
            continue
        rel = item.get("image")
        path = (dataset_dir / rel).resolve() if isinstance(rel, str) else None
        if path is None or not path.is_relative_to(dataset_dir.resolve()) or not path.is_file():
            raise TrainingError(
                f"{manifest}: kept item {item.get('source')!r} has no image {rel!r}"
            )
        images.append(path)
    if not images:
        rejected = sum(
            1 for i in data["items"] if isinstance(i, dict) and i.get("status") != "kept"
        )
        raise TrainingError(
            f"{dataset_dir}: no kept images to train on ({rejected} rejected by preprocessing)"
        )
    return InstanceSet(tuple(images), hashlib.sha256(raw).hexdigest())


AGAIN = "fix the photos or settings and run `avatarforge preprocess` again"


def _refuse_unfinished(dataset_dir: Path, data: dict) -> None:
    """A folder whose preprocessing failed or never finished is no dataset, though it has a
    manifest.json (kept so the user can read why); the error says so, and why it failed."""
    status = data.get("status")
    if status is None:
        _refuse_older_failed(dataset_dir, data)
    elif status == "failed":
        why = data.get("error") or "no reason recorded"
        raise TrainingError(
            f"{dataset_dir}: preprocessing failed, so there is nothing to train on: {why} "
            f"({MANIFEST} and contact_sheet.png there say why each photo was rejected; {AGAIN})"
        )
    elif status == "running":
        raise TrainingError(
            f"{dataset_dir}: preprocessing did not finish (stopped, or still running): "
            "run `avatarforge preprocess` again"
        )
    elif status != "ok":
        raise TrainingError(f"{dataset_dir / MANIFEST}: unknown status {status!r}")


def _refuse_older_failed(dataset_dir: Path, data: dict) -> None:
    """Manifests from before "status" existed were written by failed runs too: one of those
    has fewer usable photos than its own ``min_images``."""
    config = data.get("config")
    need = config.get("min_images") if isinstance(config, dict) else None
    items = [i for i in data["items"] if isinstance(i, dict)]
    usable = len({i.get("source") for i in items if i.get("status") == "kept"})
    if isinstance(need, int) and usable < need:
        raise TrainingError(
            f"{dataset_dir}: preprocessing failed, so there is nothing to train on: only "
            f"{usable} usable photo(s), its min_images is {need} ({MANIFEST} and "
            f"contact_sheet.png there say why each photo was rejected; {AGAIN})"
        )


def load_pixels(paths: list[Path] | tuple[Path, ...], resolution: int):
    """Images as a float tensor [N, 3, R, R] in [-1, 1]: resized (short side) and centre-cropped."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as exc:
            raise TrainingError(f"cannot read training image {path}: {exc}") from None
        scale = resolution / min(img.size)
        size = (
            max(resolution, round(img.width * scale)),
            max(resolution, round(img.height * scale)),
        )
        img = img.resize(size, Image.Resampling.BICUBIC)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0))
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


def encode_latent_params(vae, pixels, batch: int = 4):
    """The VAE's latent distribution parameters (mean and logvar) of each image, on the CPU."""
    import torch

    params = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            chunk = pixels[i : i + batch].to(vae.device, vae.dtype)
            params.append(vae.encode(chunk).latent_dist.parameters.float().cpu())
    return torch.cat(params)


def sample_latents(params, scaling_factor: float, generator):
    """One latent per row of cached parameters, drawn with ``generator`` (CPU)."""
    import torch

    mean, logvar = torch.chunk(params, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    return (mean + std * noise) * scaling_factor


def tokenize(tokenizer, prompt: str):
    """Token ids [1, max_length], padded as the pipeline pads them."""
    return tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def sample_indices(seed: int, start: int, count: int, n: int) -> list[int]:
    """Examples ``start .. start+count`` of an endless stream of per-epoch shuffles of ``n``.

    A pure function of (seed, position), so a resumed run sees the same order without saving
    any random state.
    """
    import torch

    out, perms = [], {}
    for k in range(start, start + count):
        epoch = k // n
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(perms[epoch][k % n])
    return out
