"""A StableDiffusionPipeline of a base, on the best device this machine has; compiling its UNet.

Compiling (:func:`compile_unet`, what :func:`prepare_for_serving` does where
``serving.torch_compile`` asks for it): the UNet's q, k, v projections fused, channels_last,
attention through SDPA (diffusers' processors), compiled by ``torch.compile`` with CUDA graphs
(``mode="reduce-overhead"``) where the device is CUDA. Inductor's caches go to a folder given
by the caller (the instance's shared dir), so a restarted shared base or a second instance
finds the compiled kernels instead of compiling them again.

The compile happens at the first call, and it traces the forward hooks registered by then
(the LoRA slots'): hooks added after that first call are NOT traced (torch does not guard on
module hooks), so :func:`warm_up` runs only once the slots are in place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from .identity import BaseInfo
from .logs import quiet_hf

COMPILE_CHOICES = ("auto", "on", "off")
INDUCTOR_CACHE = "torch-compile-cache"  # under the shared dir: inductor's and Triton's kernels


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


def wants_compile(setting: str, device: str) -> bool:
    """``serving.torch_compile``: auto compiles on CUDA only (on a CPU compiling takes minutes
    and saves little: the work, not launching it, is what costs there)."""
    if setting not in COMPILE_CHOICES:
        raise ValueError(f"torch_compile: one of {', '.join(COMPILE_CHOICES)} (got {setting!r})")
    return setting == "on" or (setting == "auto" and str(device).startswith("cuda"))


def use_compile_cache(folder: str | Path) -> Path:
    """Keep inductor's caches (FX graphs, AOT autograd, Triton kernels, autotuning) in
    ``folder``; call before the first compile of the process. An earlier choice stands (the
    environment's TORCHINDUCTOR_CACHE_DIR, or a first call): one process, one cache."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(folder).resolve())))
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    folder.mkdir(parents=True, exist_ok=True)
    inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    return folder


def is_compiled(module) -> bool:
    """Whether ``module.compile()`` was called (its calls go through torch.compile)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_unet(pipe, *, backend: str = "inductor", mode: str | None = None) -> None:
    """Compile the pipeline's UNet in place (lazily: at its first call), its attention's q, k
    and v projections fused into one matrix product (diffusers' ``fuse_qkv_projections``; the
    LoRA slots hook into the fused layers). CUDA: channels_last and CUDA graphs
    (``reduce-overhead``: the shapes of one request are fixed); elsewhere the default mode.
    ``backend="eager"`` traces without generating code (tests, counting graph breaks and
    recompiles in seconds)."""
    import torch

    cuda = pipe.unet.device.type == "cuda"
    pipe.unet.fuse_qkv_projections()
    pipe.unet.requires_grad_(False)  # the fused layers are new parameters; serving is frozen
    if cuda:
        pipe.unet.to(memory_format=torch.channels_last)
    if mode is None and backend == "inductor":
        mode = "reduce-overhead" if cuda else "default"
    pipe.unet.compile(backend=backend, mode=mode)


def warm_up(pipe, *, size: int = 512, steps: int = 2) -> float:
    """One generation at serving's default shape (batch 1, guidance on); returns its seconds.
    A compiled UNet compiles here (or loads its kernels from the cache)."""
    import torch

    started = time.perf_counter()
    pipe(
        prompt="warm-up",
        num_inference_steps=steps,
        guidance_scale=7.5,  # >1: the UNet's batch of 2 that every request with guidance has
        height=size,
        width=size,
        generator=torch.Generator("cpu").manual_seed(0),
    )
    if pipe.unet.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def prepare_for_serving(
    pipe,
    setting: str,
    cache_folder: str | Path,
    *,
    before_warm_up: Callable[[], None] | None = None,
    backend: str = "inductor",
    warm_up_size: int = 512,
) -> float:
    """What ``serving.torch_compile`` asks of a serving pipeline whose LoRA slots are in place:
    compile the UNet with its caches under ``cache_folder`` and warm it up, so that the first
    request does not pay for the compile. ``before_warm_up`` runs once the UNet is compiled:
    it puts the hooks in the state requests run them in (the slots' static plan), so the warm-up
    traces the graph every request uses. Returns the seconds it took (0: not compiled)."""
    if not wants_compile(setting, str(pipe.unet.device)):
        return 0.0
    use_compile_cache(cache_folder)
    compile_unet(pipe, backend=backend)
    if before_warm_up is not None:
        before_warm_up()
    return warm_up(pipe, size=warm_up_size)
