"""A StableDiffusionPipeline of a base, on the best device this machine has."""

from __future__ import annotations

from .identity import BaseInfo
from .logs import quiet_hf


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(info: BaseInfo, device: str | None = None, dtype: str | None = None):
    """A new StableDiffusionPipeline of the base: fp16 on CUDA, fp32 on CPU unless told."""
    import torch
    from diffusers import StableDiffusionPipeline

    quiet_hf()
    device = device or best_device()
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    pipe = StableDiffusionPipeline.from_pretrained(info.path, dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
