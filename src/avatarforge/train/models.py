"""The base's components as training uses them: loaded, frozen, cast, checkpointed.

Which precision a run uses is decided here too, since it decides the dtype the frozen weights
are cast to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base.identity import BaseInfo
from .config import TrainConfig
from .errors import TrainingError

PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the loss knows how to target


def resolve_precision(config: TrainConfig, device: str) -> str:
    """'no', 'fp16' or 'bf16': autocast only on CUDA (CPU autocast is slow and unneeded)."""
    import torch

    if not device.startswith("cuda") or config.mixed_precision == "no":
        return "no"
    if config.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return config.mixed_precision


@dataclass
class Models:
    tokenizer: Any
    text_encoder: Any  # None once dropped (frozen text encoder: its embeddings are cached)
    vae: Any
    unet: Any
    scheduler: Any


def load_models(base: BaseInfo, device: str, weight_dtype) -> Models:
    """The base's components, frozen, on ``device`` in ``weight_dtype`` (the VAE in fp32)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = base.path
    try:
        models = Models(
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
            scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        )
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load base {base.base_id} from {path}: {exc}") from None
    kind = models.scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise TrainingError(f"base scheduler prediction_type {kind!r} is not supported")
    for m in (models.text_encoder, models.vae, models.unet):
        m.requires_grad_(False)
        m.to(device, weight_dtype)
    # the VAE stays fp32: fp16 SD VAEs overflow, and it only runs once when latents are cached
    models.vae.to(device, torch.float32)
    return models


def enable_checkpointing(models: Models, train_text_encoder: bool) -> None:
    models.unet.enable_gradient_checkpointing()  # diffusers uses use_reentrant=False
    if train_text_encoder:
        te = models.text_encoder
        enable = getattr(te, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers < 5
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
