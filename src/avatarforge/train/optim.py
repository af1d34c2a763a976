"""The optimizer (8-bit Adam where bitsandbytes and CUDA exist, AdamW otherwise; logged) and
its learning-rate schedule (diffusers' ``get_scheduler``)."""

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
    # fused on CUDA: one kernel for all the LoRA tensors instead of a few per tensor
    fused = True if device.startswith("cuda") else None
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused), "adamw"


def make_lr_scheduler(optimizer, *, warmup: int, start: int):
    """diffusers' ``constant_with_warmup`` schedule, positioned for optimizer step ``start``.

    The schedule is rebuilt from the step alone (no state in checkpoints): it is created as if
    ``start`` steps were done, and counted from 1, so step ``k`` (0-based) trains with
    ``lr * min(1, (k + 1) / warmup)`` — the first step never has a learning rate of 0.
    Call ``step()`` after each optimizer step.
    """
    from diffusers.optimization import get_scheduler

    for group in optimizer.param_groups:  # what torch needs to start a schedule mid-way
        group.setdefault("initial_lr", group["lr"])
    return get_scheduler(
        "constant_with_warmup", optimizer, num_warmup_steps=warmup, last_epoch=start
    )
