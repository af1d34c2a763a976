"""The optimizer: 8-bit Adam where bitsandbytes and CUDA exist, AdamW otherwise (logged)."""

from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger(__name__)


def make_optimizer(params, *, lr: float, weight_decay: float, use_8bit: bool, device: str):
    """Returns (optimizer, name). 8-bit Adam quarters optimizer-state memory on the GPU."""
    import torch

    if use_8bit and device.startswith("cuda") and importlib.util.find_spec("bitsandbytes"):
        import bitsandbytes as bnb

        log.info("optimizer: 8-bit AdamW (bitsandbytes)")
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay), "adamw8bit"
    if use_8bit:
        why = "not on CUDA" if not device.startswith("cuda") else "bitsandbytes is not installed"
        log.info("optimizer: AdamW (8-bit Adam asked for, but %s)", why)
    else:
        log.info("optimizer: AdamW")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), "adamw"


def lr_at(step: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up then constant; a pure function of the step so a resume needs no state."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr
