"""The step math: what one optimizer step reads, and the DreamBooth loss of one micro-batch.

Noise, timesteps and which images a micro-batch sees are pure functions of (seed, step,
micro-batch), so a resumed run repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .data import encode_latent_params, load_pixels, sample_indices, sample_latents, tokenize
from .models import Models


@dataclass
class StepData:
    """The training images and prompts, prepared once for every step."""

    instance_latents: Any  # cached latent-distribution params [N, 8, h, w], or None
    class_latents: Any
    instance_pixels: Any  # when latents are not cached
    class_pixels: Any
    instance_ids: Any  # [1, 77]
    class_ids: Any
    instance_embeds: Any  # cached when the text encoder is frozen
    class_embeds: Any
    n_instance: int
    n_class: int


def prepare_data(
    models: Models, images, class_paths: list[Path], config: TrainConfig, device: str
) -> StepData:
    """Load the images, encode them once (``cache_latents``), tokenize the two prompts, and
    embed them once when the text encoder is frozen."""
    import torch

    inst_px = load_pixels(images, config.resolution)
    cls_px = load_pixels(class_paths, config.resolution) if class_paths else None
    inst_lat = cls_lat = None
    if config.cache_latents:
        inst_lat = encode_latent_params(models.vae, inst_px)
        cls_lat = encode_latent_params(models.vae, cls_px) if cls_px is not None else None
        inst_px = cls_px = None
    inst_ids = tokenize(models.tokenizer, config.instance_prompt)
    cls_ids = tokenize(models.tokenizer, config.class_prompt)
    inst_emb = cls_emb = None
    if not config.train_text_encoder:
        with torch.no_grad():
            inst_emb = models.text_encoder(inst_ids.to(device))[0]
            cls_emb = models.text_encoder(cls_ids.to(device))[0]
    return StepData(
        inst_lat,
        cls_lat,
        inst_px,
        cls_px,
        inst_ids,
        cls_ids,
        inst_emb,
        cls_emb,
        len(images),
        len(class_paths),
    )


def step_seed(seed: int, step: int, micro: int) -> int:
    """The seed of one micro-batch's generator (noise, timesteps, latent samples)."""
    digest = hashlib.sha256(f"{seed}:{step}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _latents(models: Models, cached, pixels, idx: list[int], generator, device: str):
    if cached is not None:
        params = cached[idx]
    else:
        params = encode_latent_params(models.vae, pixels[idx], batch=len(idx))
    return sample_latents(params, models.vae.config.scaling_factor, generator).to(device)


def micro_loss(models: Models, data: StepData, config: TrainConfig, step: int, micro: int, device):
    """The DreamBooth loss of one micro-batch: instance MSE + weight x prior MSE."""
    import torch
    import torch.nn.functional as F

    b = config.batch_size
    g = torch.Generator().manual_seed(step_seed(config.seed, step, micro))
    position = (step * config.gradient_accumulation + micro) * b
    idx = sample_indices(config.seed, position, b, data.n_instance)
    latents = _latents(models, data.instance_latents, data.instance_pixels, idx, g, device)
    prior = config.prior_preservation and data.n_class > 0
    if prior:
        cidx = sample_indices(config.seed + 1, position, b, data.n_class)
        cls = _latents(models, data.class_latents, data.class_pixels, cidx, g, device)
        latents = torch.cat([latents, cls])
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=g).to(device)
    timesteps = torch.randint(0, models.scheduler.config.num_train_timesteps, (n,), generator=g)
    timesteps = timesteps.to(device)
    noisy = models.scheduler.add_noise(latents, noise, timesteps)

    if config.train_text_encoder:
        ids = torch.cat([data.instance_ids.repeat(b, 1)] + ([data.class_ids.repeat(b, 1)] * prior))
        embeds = models.text_encoder(ids.to(device))[0]
    else:
        embeds = torch.cat(
            [data.instance_embeds.repeat(b, 1, 1)] + ([data.class_embeds.repeat(b, 1, 1)] * prior)
        )
    dtype = next(models.unet.parameters()).dtype
    pred = models.unet(noisy.to(dtype), timesteps, embeds.to(dtype)).sample.float()

    # load_models refused any other prediction_type
    if models.scheduler.config.prediction_type == "v_prediction":
        target = models.scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    loss = F.mse_loss(pred[:b], target[:b].float())
    if prior:
        loss = loss + config.prior_loss_weight * F.mse_loss(pred[b:], target[b:].float())
    return loss
