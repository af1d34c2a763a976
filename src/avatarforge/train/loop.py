"""The training run: DreamBooth with prior preservation, LoRA on UNet and text encoder.

``train()`` reads the preprocessed dataset, makes (or reuses) the class images, loads the base's
components, caches what does not change (VAE latents; text embeddings when the text encoder is
frozen), adds LoRA, and runs the optimizer steps with accumulation, optional autocast (CUDA
only), gradient checkpointing, checkpoints (every N steps and every M minutes) and resume. The
result is an adapter folder in the one format of :mod:`avatarforge.adapter`; anything else
raises :class:`TrainingError`.

This module is the orchestration; the models are in :mod:`.models`, the loss of one
micro-batch in :mod:`.step`, precision/accumulation/clipping in :mod:`.accelerator`
(accelerate), the learning-rate schedule in :mod:`.optim` (diffusers), checkpoints in
:mod:`.checkpoint`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..adapter import WEIGHTS_FILE, AdapterMetadata, save_adapter
from ..base.config import BaseConfig, resolve_base
from ..base.identity import BaseError, BaseInfo
from ..base.logs import quiet_hf
from ..base.pipeline import best_device
from . import checkpoint as ckpt
from .accelerator import make_accelerator
from .class_images import class_images
from .config import TrainConfig
from .data import read_dataset
from .errors import TrainingError, TrainingStopped
from .lora import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    adapter_config_dict,
    add_lora,
    diffusers_layers,
    peft_state,
    restore_peft_state,
)
from .models import (
    Models,
    decide_checkpointing,
    enable_checkpointing,
    load_models,
    resolve_precision,
)
from .optim import make_lr_scheduler, make_optimizer
from .step import micro_loss, prepare_data

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
PREVIOUS_ADAPTER_DIR = "adapter.previous"  # an earlier run's adapter while a new run trains
CHECKPOINT_DIR = "checkpoints"
TRAIN_CONFIG_FILE = "train_config.json"
TRAIN_LOG_FILE = "train_log.json"


@dataclass
class StepInfo:
    """Passed to ``on_step`` after every optimizer step (progress reporting, tests)."""

    step: int  # optimizer steps completed
    total: int
    loss: float
    seconds: float


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    losses: list[float]  # one per optimizer step, from step 1 (resumed runs included)
    peak_memory_bytes: int  # CUDA: max allocated; CPU: peak RSS of this process
    seconds: float  # wall time of this call
    metadata: AdapterMetadata
    resumed_from: int = 0
    step_seconds: float = 0.0  # mean optimizer-step time in this call
    optimizer: str = "adamw"
    device: str = "cpu"
    log: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- small helpers


def _peak_memory(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _progress(config: TrainConfig, start: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=config.steps, initial=start, disable=not config.progress, desc="train", unit="step"
    )


# ---------------------------------------------------------------- the run


def train(
    dataset_dir: Path,
    out_dir: Path,
    config: TrainConfig,
    base: BaseInfo | None = None,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Train a DreamBooth LoRA for the photos in ``dataset_dir``; the adapter goes to
    ``out_dir/adapter`` and resumable checkpoints to ``out_dir/checkpoints``.

    ``should_stop`` is asked after each optimizer step; when it says True the run saves a
    checkpoint and stops as ``max_steps_this_run`` does (a deadline). ``on_checkpoint`` gets
    each checkpoint folder once it is saved (to copy it somewhere safer).

    Raises :class:`TrainingError` when it cannot produce a trustworthy adapter and
    :class:`TrainingStopped` (a TrainingError) when ``max_steps_this_run`` or ``should_stop``
    ended the run early.
    """
    import torch

    started = time.perf_counter()
    quiet_hf()
    out_dir = Path(out_dir)
    instances = read_dataset(Path(dataset_dir))
    if base is None:
        try:
            base = resolve_base(BaseConfig(base=config.base))
        except BaseError as exc:
            raise TrainingError(str(exc)) from None
    device = config.device or best_device()
    precision = resolve_precision(config, device)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)

    identity = {
        "config": config.result_fields(),
        "dataset_hash": instances.dataset_hash,
        "base_hash": base.content_hash,
    }
    _set_aside(out_dir / ADAPTER_DIR)
    ckpt_root = out_dir / CHECKPOINT_DIR
    resume_from = ckpt.latest(ckpt_root) if config.resume else None
    if not config.resume and ckpt_root.exists():
        shutil.rmtree(ckpt_root)
    checkpoint, lora_state, optim_state = (None, None, None)
    if resume_from is not None:
        checkpoint, lora_state, optim_state = ckpt.load(resume_from, identity)
        log.info("resuming from %s (step %d)", resume_from, checkpoint.step)

    class_paths = run_class_images(base, config, device)
    models = load_models(base, device, weight_dtype)
    data = prepare_data(models, instances.images, class_paths, config, device)
    release_cached(models, config)
    gc.collect()

    params = add_trainable(models, config)
    optimizer, optimizer_name = config_optimizer(params, config, device)
    accelerator = make_accelerator(precision, config.gradient_accumulation, device)
    start, losses = 0, []
    if checkpoint is not None:
        restore_peft_state(models.unet, _unprefix(lora_state, "unet."))
        if models.text_encoder is not None:
            restore_peft_state(models.text_encoder, _unprefix(lora_state, "text_encoder."))
        optimizer.load_state_dict(optim_state["optimizer"])
        if accelerator.scaler is not None and optim_state.get("scaler"):
            accelerator.scaler.load_state_dict(optim_state["scaler"])
        start, losses = checkpoint.step, list(checkpoint.losses)
    lr_scheduler = make_lr_scheduler(optimizer, warmup=config.lr_warmup_steps, start=start)
    optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    log.info(
        "training %d steps on %s (precision %s, %s, attention SDPA, gradient checkpointing %s)",
        config.steps,
        device,
        precision,
        optimizer_name,
        "on" if models.checkpointing[0] else "off",
    )

    stop_at = config.steps
    if config.max_steps_this_run:
        stop_at = min(config.steps, start + config.max_steps_this_run)
    step_times: list[float] = []
    bar = _progress(config, start)
    last_saved = time.monotonic()
    try:
        for step in range(start, stop_at):
            t0 = time.perf_counter()
            total = optimizer_step(
                accelerator, models, data, config, step, device, optimizer, params
            )
            lr_scheduler.step()
            losses.append(total)
            done = step + 1
            step_times.append(time.perf_counter() - t0)
            # told before the bar shows it: a stop signal the bar prompts finds the step counted
            if on_step is not None:
                on_step(StepInfo(done, config.steps, total, step_times[-1]))
            bar.set_postfix(loss=f"{total:.4f}", step_s=f"{step_times[-1]:.2f}")
            bar.update(1)
            stop_now = done < config.steps and should_stop is not None and should_stop()
            minutes = (time.monotonic() - last_saved) / 60
            due = done % config.checkpoint_every == 0 or (
                config.checkpoint_minutes and minutes >= config.checkpoint_minutes
            )
            if done < config.steps and (due or done == stop_at or stop_now):
                with _writing("a checkpoint", ckpt_root):
                    saved = _save_checkpoint(
                        ckpt_root, done, models, optimizer, accelerator.scaler, losses, identity
                    )
                last_saved = time.monotonic()
                if on_checkpoint is not None:
                    on_checkpoint(saved)
            if stop_now:
                raise TrainingStopped(done, config.steps, saved, reason="should_stop")
    finally:
        bar.close()

    if stop_at < config.steps:
        raise TrainingStopped(stop_at, config.steps, ckpt.latest(ckpt_root) or ckpt_root)

    metadata = _metadata(config, base, instances.dataset_hash, optimizer_name, precision)
    with _writing("the adapter", out_dir / ADAPTER_DIR):
        adapter_dir = _save(models, config, metadata, out_dir / ADAPTER_DIR)
    shutil.rmtree(out_dir / PREVIOUS_ADAPTER_DIR, ignore_errors=True)  # superseded
    seconds = time.perf_counter() - started
    result = TrainResult(
        adapter_dir=adapter_dir,
        steps=config.steps,
        losses=losses,
        peak_memory_bytes=_peak_memory(device),
        seconds=seconds,
        metadata=metadata,
        resumed_from=start,
        step_seconds=sum(step_times) / len(step_times) if step_times else 0.0,
        optimizer=optimizer_name,
        device=device,
    )
    result.log = {
        "steps": result.steps,
        "resumed_from": start,
        "losses": losses,
        "step_seconds": result.step_seconds,
        "peak_memory_bytes": result.peak_memory_bytes,
        "peak_memory_kind": "cuda max_memory_allocated" if device.startswith("cuda") else "rss",
        "seconds": seconds,
        "device": device,
        "precision": precision,
        "optimizer": optimizer_name,
        "gradient_checkpointing": {"on": models.checkpointing[0], "why": models.checkpointing[1]},
        "adapter_bytes": (adapter_dir / WEIGHTS_FILE).stat().st_size,
    }
    (out_dir / TRAIN_LOG_FILE).write_text(json.dumps(result.log, indent=1) + "\n")
    shutil.rmtree(ckpt_root, ignore_errors=True)  # the adapter supersedes them
    log.info(
        "adapter at %s (%d steps, final loss %.4f, peak memory %.1f MiB)",
        adapter_dir,
        result.steps,
        losses[-1],
        result.peak_memory_bytes / 2**20,
    )
    return result


def run_class_images(base: BaseInfo, config: TrainConfig, device: str) -> list[Path]:
    """The run's class images (made once, cached; none without prior preservation)."""
    if not config.prior_preservation:
        return []
    return class_images(
        base,
        config.class_prompt,
        config.num_class_images,
        config.resolution,
        steps=config.class_image_steps,
        guidance=config.class_image_guidance,
        device=device,
        progress=config.progress,
    )


def release_cached(models: Models, config: TrainConfig) -> None:
    """Once the data is prepared: with cached latents only the VAE's config is needed (it
    moves to the CPU); a frozen text encoder's embeddings are cached (it goes)."""
    if config.cache_latents:
        models.vae = models.vae.to("cpu")
    if not config.train_text_encoder:
        models.text_encoder = None


def config_optimizer(params, config: TrainConfig, device: str):
    """(optimizer, its name) for the trainable ``params`` as ``config`` asks."""
    return make_optimizer(
        params,
        lr=config.learning_rate,
        weight_decay=config.adam_weight_decay,
        use_8bit=config.use_8bit_adam,
        device=device,
    )


def add_trainable(models: Models, config: TrainConfig) -> list:
    """Add the seeded LoRA layers (fp32 even on a fp16/bf16 base), switch on activation
    recomputation as configured, and put the models in training mode. Returns the trainable
    parameters."""
    import torch

    torch.manual_seed(config.seed)  # LoRA init is the only use of the global generator
    params = add_lora(
        models.unet,
        models.text_encoder,
        unet_rank=config.unet_rank,
        unet_alpha=config.unet_alpha,
        text_encoder_rank=config.text_encoder_rank,
        text_encoder_alpha=config.text_encoder_alpha,
    )
    for p in params:  # trainable weights in fp32 even when the frozen base is fp16/bf16
        p.data = p.data.float()
    models.checkpointing = decide_checkpointing(config, models, str(models.unet.device))
    log.info("gradient checkpointing %s", models.checkpointing[1])
    if models.checkpointing[0]:
        enable_checkpointing(models, config.train_text_encoder)
    models.unet.train()
    if models.text_encoder is not None:
        models.text_encoder.train()
    return params


def optimizer_step(
    accelerator,
    models: Models,
    data,
    config: TrainConfig,
    step: int,
    device: str,
    optimizer,
    params,
) -> float:
    """One optimizer step (0-based ``step``): the micro-batches' losses under autocast, their
    gradients accumulated (and fp16-scaled) by ``accelerator``, a finite-loss check, clipping,
    the optimizer step. Returns the step's loss (the mean over its micro-batches)."""
    accumulation = config.gradient_accumulation
    total = 0.0
    for micro in range(accumulation):
        with accelerator.accumulate():
            with accelerator.autocast():
                loss = micro_loss(models, data, config, step, micro, device)
            accelerator.backward(loss)  # divides by the accumulation steps
            total += float(loss.detach() / accumulation)
    if not math.isfinite(total):
        raise TrainingError(
            f"loss is {total} at step {step + 1}; lower learning_rate or use "
            "mixed_precision=bf16/no"
        )
    if config.max_grad_norm:
        accelerator.clip_grad_norm_(params, config.max_grad_norm)  # unscales fp16 first
    optimizer.step()  # accelerate's wrapper: skipped when fp16 gradients overflowed
    optimizer.zero_grad(set_to_none=True)
    return total


def _unprefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _save(models: Models, config: TrainConfig, metadata: AdapterMetadata, adapter_dir: Path):
    te = models.text_encoder
    return save_adapter(
        adapter_dir,
        diffusers_layers(models.unet),
        diffusers_layers(te) if te is not None else None,
        metadata,
        unet_lora_config=adapter_config_dict(models.unet),
        text_encoder_lora_config=adapter_config_dict(te) if te is not None else None,
        extra_files={TRAIN_CONFIG_FILE: json.dumps(config.to_dict(), indent=2, sort_keys=True)},
    )


def _set_aside(adapter_dir: Path) -> None:
    """Move an earlier run's adapter to ``adapter.previous`` while this run trains: a run that
    fails must leave no adapter that looks like its result (packaging would ship the old one).
    A successful run deletes it; a failed one says where it is."""
    if adapter_dir.exists():
        previous = adapter_dir.with_name(PREVIOUS_ADAPTER_DIR)
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(adapter_dir, previous)
        log.info("the adapter of an earlier run is in %s until this run finishes", previous)


@contextlib.contextmanager
def _writing(what: str, where: Path):
    """A failed write (disk full, quota, file-size limit) as a TrainingError saying what."""
    from safetensors import SafetensorError  # its writer reports I/O errors as its own

    try:
        yield
    except (OSError, SafetensorError) as exc:
        previous = where.parent / PREVIOUS_ADAPTER_DIR
        kept = f"; the earlier adapter is kept in {previous}" if previous.exists() else ""
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TrainingError(
            f"could not write {what} to {where}: {why} (disk full? free space "
            f"and run the same command again: it resumes from the last checkpoint){kept}"
        ) from exc


def _save_checkpoint(root, step, models: Models, optimizer, scaler, losses, identity) -> Path:
    lora = {f"unet.{k}": v for k, v in peft_state(models.unet).items()}
    if models.text_encoder is not None:
        lora |= {f"text_encoder.{k}": v for k, v in peft_state(models.text_encoder).items()}
    state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else {}}
    return ckpt.save(root, step, lora, state, losses, identity)


def _metadata(config: TrainConfig, base: BaseInfo, dataset_hash: str, optimizer: str, precision):
    te = config.train_text_encoder
    return AdapterMetadata(
        base_id=base.base_id,
        base_hash=base.content_hash,
        unet_rank=config.unet_rank,
        unet_alpha=config.unet_alpha,
        text_encoder_rank=config.text_encoder_rank if te else 0,
        text_encoder_alpha=config.text_encoder_alpha if te else 0.0,
        token=config.token,
        instance_prompt=config.instance_prompt,
        class_prompt=config.class_prompt,
        steps=config.steps,
        dataset_hash=dataset_hash,
        trainer_version=f"avatarforge {__version__}",
        seed=config.seed,
        resolution=config.resolution,
        prior_preservation=config.prior_preservation,
        weights_dtype=config.save_dtype,
        extra={
            "unet_targets": list(UNET_TARGETS),
            "text_encoder_targets": list(TEXT_ENCODER_TARGETS) if te else [],
            "prior_loss_weight": config.prior_loss_weight,
            "num_class_images": config.num_class_images if config.prior_preservation else 0,
            "learning_rate": config.learning_rate,
            "optimizer": optimizer,
            "precision": precision,
        },
    )
