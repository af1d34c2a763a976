"""How long a training run will take on this machine, measured before the long work starts.

A run is class images, then setup, then optimizer steps; each unit is timed on this device,
at the run's resolution and with its settings, after one untimed warm-up (the median of up to 5
calls within about a second; a call over 5 s is timed once, warm-up included):

- class images: ``missing x (class_image_steps x one denoising step + one VAE decode)`` plus
  loading the pipeline (a denoising step is one UNet call: a batch of 2 with guidance);
- setup: loading the models, plus one VAE encode per training and class image (cached latents);
- training: ``steps left x one optimizer step``, timed with the trainer's own step
  (:func:`.loop.optimizer_step`: LoRA, accumulation, text encoder, activation recomputation and
  optimizer as configured) on random inputs of the run's shapes.

Cached class images and the steps of a checkpoint the run will resume from are not counted.
On the tiny base measuring takes about a second; on a full-size SD 2.1 base on 2 CPU cores at
512 px, about two minutes (a model load, one training step, two denoising steps).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..base.identity import BaseInfo
from ..base.logs import quiet_hf
from . import checkpoint as ckpt
from .class_images import cache_dir, missing_count
from .config import TrainConfig

LONG_CALL_S = 5.0


@dataclass(frozen=True)
class Estimate:
    """Measured unit costs of one run and the totals they add up to (seconds)."""

    device: str
    resolution: int
    class_images: int  # still to make (cached ones are free)
    class_image_steps: int
    denoise_s: float  # one denoising step of a class image
    decode_s: float  # one VAE decode (per class image)
    load_s: float  # loading the base's models (once for class images, once for training)
    encode_images: int  # images the VAE encodes once (cached latents)
    encode_s: float
    steps: int  # optimizer steps still to run
    step_s: float  # one optimizer step
    measure_s: float  # what measuring took

    @property
    def class_images_s(self) -> float:
        if not self.class_images:
            return 0.0
        per_image = self.class_image_steps * self.denoise_s + self.decode_s
        return self.load_s + self.class_images * per_image

    @property
    def setup_s(self) -> float:
        return self.load_s + self.encode_images * self.encode_s

    @property
    def training_s(self) -> float:
        return self.steps * self.step_s

    @property
    def total_s(self) -> float:
        return self.class_images_s + self.setup_s + self.training_s


def _timed(fn: Callable[[], object], budget_s: float = 1.0, most: int = 5) -> float:
    """Seconds of one call of ``fn``: the median of up to ``most`` calls within about
    ``budget_s``, after an untimed one (first calls pay for allocations) — unless that first
    call alone took more than ``LONG_CALL_S``: then its start-up cost is small beside it, and a
    second call would double what measuring a slow machine costs."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > LONG_CALL_S:
        return first
    times: list[float] = []
    while len(times) < most and sum(times) < budget_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def estimate_run(
    base: BaseInfo,
    config: TrainConfig,
    device: str,
    *,
    instance_images: int,
    out_dir: Path | None = None,
) -> Estimate:
    """Measure what a run of ``config`` on ``device`` costs here; ``instance_images`` is the
    dataset's image count, ``out_dir`` the run's output folder (a checkpoint there is resumed
    from when ``config.resume``)."""
    import torch

    from .loop import CHECKPOINT_DIR
    from .models import load_models, resolve_precision

    started = time.perf_counter()
    quiet_hf()
    prior = config.prior_preservation
    folder = cache_dir(
        base,
        config.class_prompt,
        config.resolution,
        steps=config.class_image_steps,
        guidance=config.class_image_guidance,
    )
    missing = missing_count(config.num_class_images, folder) if prior else 0
    done = ckpt.saved_step(Path(out_dir) / CHECKPOINT_DIR) if out_dir and config.resume else 0
    steps = max(0, config.steps - done)
    encode_images = (instance_images + (config.num_class_images if prior else 0)) * int(
        config.cache_latents
    )
    precision = resolve_precision(config, device)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]

    t0 = time.perf_counter()
    models = load_models(base, device, dtype)
    load_s = time.perf_counter() - t0
    denoise_s, decode_s, encode_s = _measure_vae_and_denoising(
        models, config, device, dtype, bool(missing), bool(encode_images)
    )
    step_s = _measure_step(models, config, device, precision) if steps else 0.0
    models = None  # free the base before the run loads it again
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return Estimate(
        device=device,
        resolution=config.resolution,
        class_images=missing,
        class_image_steps=config.class_image_steps,
        denoise_s=denoise_s,
        decode_s=decode_s,
        load_s=load_s,
        encode_images=encode_images,
        encode_s=encode_s,
        steps=steps,
        step_s=step_s,
        measure_s=time.perf_counter() - started,
    )


def _latent_shape(models, config: TrainConfig) -> tuple[int, int, int]:
    """(latent channels, latent side, VAE downscale) of this base at the run's resolution."""
    scale = 2 ** (len(models.vae.config.block_out_channels) - 1)
    return models.unet.config.in_channels, config.resolution // scale, scale


def _measure_vae_and_denoising(models, config, device, dtype, denoise: bool, encode: bool):
    """(one denoising step, one VAE decode, one VAE encode) in seconds; 0 where not needed."""
    import torch

    from .data import tokenize

    vae, unet = models.vae, models.unet
    channels, side, _ = _latent_shape(models, config)
    denoise_s = decode_s = encode_s = 0.0
    with torch.no_grad():
        if denoise:
            ids = tokenize(models.tokenizer, config.class_prompt).to(device)
            batch = 2 if config.class_image_guidance > 1 else 1  # guidance: cond + uncond
            cond = models.text_encoder(ids)[0].repeat(batch, 1, 1).to(dtype)
            latents = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
            denoise_s = _timed(lambda: unet(latents, 500, cond))
            one = latents[:1].float() / vae.config.scaling_factor
            decode_s = _timed(lambda: vae.decode(one))
        if encode:
            pixels = torch.zeros(1, 3, config.resolution, config.resolution, device=device)
            encode_s = _timed(lambda: vae.encode(pixels))
    return denoise_s, decode_s, encode_s


def _measure_step(models, config: TrainConfig, device: str, precision: str) -> float:
    """One optimizer step of the trainer's own code on random inputs of the run's shapes
    (changes ``models``: LoRA is added, the VAE may move to the CPU)."""
    import torch

    from .accelerator import make_accelerator
    from .data import tokenize
    from .loop import add_trainable, config_optimizer, optimizer_step, release_cached
    from .step import StepData

    channels, side, _ = _latent_shape(models, config)
    prior, cached = config.prior_preservation, config.cache_latents
    frozen_te = not config.train_text_encoder
    ids = tokenize(models.tokenizer, config.instance_prompt)
    embeds = None
    if frozen_te:
        with torch.no_grad():
            embeds = models.text_encoder(ids.to(device))[0]
    shape = (1, 2 * channels, side, side)  # the latent distribution's mean and logvar
    pixels = torch.zeros(1, 3, config.resolution, config.resolution)
    data = StepData(
        instance_latents=torch.randn(shape) if cached else None,
        class_latents=torch.randn(shape) if cached and prior else None,
        instance_pixels=None if cached else pixels,
        class_pixels=None if cached or not prior else pixels,
        instance_ids=ids,
        class_ids=ids,
        instance_embeds=embeds,
        class_embeds=embeds,
        n_instance=1,
        n_class=1 if prior else 0,
    )
    release_cached(models, config)  # as the trainer does
    params = add_trainable(models, config)
    optimizer, _ = config_optimizer(params, config, device)
    accelerator = make_accelerator(precision, config.gradient_accumulation, device)
    optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    step = [0]

    def one_step() -> None:
        optimizer_step(accelerator, models, data, config, step[0], device, optimizer, params)
        step[0] += 1

    return _timed(one_step)
