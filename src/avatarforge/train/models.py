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


# Activation memory of one training row (an instance or a prior image) at 512 px without
# recomputation, on SD 2.1 (865.9M-parameter UNet), bf16: measured on an H200 (2026-11-26) as the
# peak of a default run (5.7 GiB, 2 rows) less the frozen weights on the GPU (~2.4 GiB), rounded
# up. It grows with rows x pixels; the UNet's size stands in for its widths on other bases.
ACTIVATIONS_PER_ROW_512 = 1.7 * 2**30
SD21_UNET_PARAMS = 865_910_724
HEADROOM = 1.5  # the estimate is rough: recompute unless 1.5x of it is free


@dataclass
class Models:
    tokenizer: Any
    text_encoder: Any  # None once dropped (frozen text encoder: its embeddings are cached)
    vae: Any
    unet: Any
    scheduler: Any
    checkpointing: tuple[bool, str] | None = None  # (on, why): decided by add_trainable


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
    if device.startswith("cuda"):  # the layout cuDNN's convolutions are fastest in
        models.unet.to(memory_format=torch.channels_last)
    return models


def activation_bytes(config: TrainConfig, unet) -> int:
    """About what the run's activations take on the GPU without recomputation."""
    rows = config.batch_size * (2 if config.prior_preservation else 1)
    size = sum(p.numel() for p in unet.parameters()) / SD21_UNET_PARAMS
    return int(ACTIVATIONS_PER_ROW_512 * rows * (config.resolution / 512) ** 2 * size)


def decide_checkpointing(
    config: TrainConfig, models: Models, device: str, free_bytes: int | None = None
) -> tuple[bool, str]:
    """Whether to recompute activations, and why: ``on``/``off`` as set; ``auto`` recomputes
    only on CUDA when the free memory (with the frozen models loaded; ``free_bytes`` stands
    in for the device's in tests) is short of 1.5x the activations' estimate."""
    setting = config.gradient_checkpointing
    if setting != "auto":
        return setting == "on", f"train.gradient_checkpointing={setting}"
    if not device.startswith("cuda"):
        return False, f"auto: off on {device} (recomputing only costs time there)"
    if free_bytes is None:
        import torch

        free_bytes = torch.cuda.mem_get_info(torch.device(device))[0]
    need = activation_bytes(config, models.unet)
    numbers = f"{free_bytes / 2**30:.1f} GiB free, ~{need / 2**30:.1f} GiB of activations"
    if free_bytes >= HEADROOM * need:
        return False, f"auto: off ({numbers})"
    return True, f"auto: on ({numbers}; less than {HEADROOM}x free)"


def enable_checkpointing(models: Models, train_text_encoder: bool) -> None:
    models.unet.enable_gradient_checkpointing()  # diffusers uses use_reentrant=False
    if train_text_encoder:
        te = models.text_encoder
        enable = getattr(te, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers < 5
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
