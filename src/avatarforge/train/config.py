"""TrainConfig: every training default, written down once with its bounds; named presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base.config import TINY
from ..settings import ConfigError, Settings, setting

TOKEN = "<<TOK>>"
CHECKPOINTING = ("auto", "on", "off")

# Fields that steer one run but not its result: they may differ when a run is resumed.
RUN_CONTROL = frozenset(
    {
        "gradient_checkpointing",  # recomputing changes memory and time, not the weights
        "max_steps_this_run",
        "resume",
        "progress",
        "checkpoint_every",
        "checkpoint_minutes",
        "device",
    }
)


@dataclass
class TrainConfig(Settings):
    """DreamBooth + LoRA on the serving base. Defaults: small adapters, < 12 GB on a 24 GB GPU."""

    section = "train"
    base: str = setting(
        TINY, "base model: 'tiny', a diffusers folder or a hub id (the serving one)"
    )
    token: str = setting(TOKEN, "unique token that names the person in prompts")
    instance_prompt: str = setting(f"a photo of {TOKEN} person", "prompt of the user's photos")
    class_prompt: str = setting("a photo of person", "prompt of the prior-preservation images")
    resolution: int = setting(512, "training resolution in pixels (multiple of 8)", ge=64, le=1024)
    steps: int = setting(800, "optimizer steps", ge=1, le=100_000)
    batch_size: int = setting(1, "instance images per micro-batch", ge=1, le=64)
    gradient_accumulation: int = setting(1, "micro-batches per optimizer step", ge=1, le=128)
    learning_rate: float = setting(1e-4, "AdamW learning rate", ge=0.0, le=1.0)
    lr_warmup_steps: int = setting(0, "linear warm-up steps, then constant", ge=0)
    adam_weight_decay: float = setting(1e-2, "AdamW weight decay", ge=0.0, le=1.0)
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0: off)", ge=0.0)
    unet_rank: int = setting(8, "LoRA rank of the UNet attention projections", ge=1, le=512)
    unet_alpha: float = setting(8.0, "LoRA alpha of the UNet (scale = alpha / rank)", ge=0.0)
    train_text_encoder: bool = setting(True, "also train a LoRA on the text encoder")
    text_encoder_rank: int = setting(8, "LoRA rank of the text encoder projections", ge=1, le=512)
    text_encoder_alpha: float = setting(8.0, "LoRA alpha of the text encoder", ge=0.0)
    prior_preservation: bool = setting(True, "DreamBooth prior-preservation loss on class images")
    prior_loss_weight: float = setting(1.0, "weight of the prior-preservation loss", ge=0.0)
    num_class_images: int = setting(50, "class images generated with the base", ge=1, le=10_000)
    class_image_steps: int = setting(25, "denoising steps per class image", ge=1, le=150)
    class_image_guidance: float = setting(7.5, "guidance scale of class images", ge=0.0, le=30.0)
    mixed_precision: str = setting(
        "auto",
        "autocast on CUDA: auto (bf16 where supported, else fp16), fp16, bf16, no; "
        "always fp32 on CPU",
        choices=("auto", "fp16", "bf16", "no"),
    )
    use_8bit_adam: bool = setting(True, "8-bit Adam when bitsandbytes and CUDA are available")
    gradient_checkpointing: str = setting(
        "auto",
        "recompute activations in the backward pass: saves GPU memory, costs time (2x the step "
        "on an H200, where it saved nothing); auto: only when the GPU's free memory is short of "
        "what the run needs without it (never on a CPU); on; off",
        choices=CHECKPOINTING,
    )
    cache_latents: bool = setting(True, "encode images with the VAE once, then free the VAE")
    save_dtype: str = setting(
        "float16", "dtype of the saved adapter weights", choices=("float16", "float32")
    )
    seed: int = setting(0, "seed of LoRA init, noise, timesteps and data order", ge=0, le=2**31)
    checkpoint_every: int = setting(100, "save a resumable checkpoint every N steps", ge=1)
    checkpoint_minutes: float = setting(
        5.0,
        "also save one when N minutes passed without one (0: off): a slow CPU run loses little",
        ge=0.0,
    )
    max_steps_this_run: int = setting(
        0, "stop (resumably) after N steps in this process (0: no limit); for time-boxed jobs", ge=0
    )
    resume: bool = setting(True, "continue from the last checkpoint in the output folder")
    progress: bool = setting(True, "show a progress bar with loss, step time and ETA")
    device: str = setting("", "torch device ('' : cuda when available, else cpu)")

    def __post_init__(self) -> None:
        # true/false as the setting was before auto existed (saved configs, callers)
        if isinstance(self.gradient_checkpointing, bool):
            self.gradient_checkpointing = "on" if self.gradient_checkpointing else "off"
        super().__post_init__()

    def validate(self) -> None:
        if self.resolution % 8:
            raise ConfigError(f"train.resolution: must be a multiple of 8 (got {self.resolution})")
        if not self.token.strip():
            raise ConfigError("train.token: must not be empty")
        if self.token not in self.instance_prompt:
            raise ConfigError(
                f"train.instance_prompt: must contain the token {self.token!r} "
                f"(got {self.instance_prompt!r})"
            )
        if self.token in self.class_prompt:
            raise ConfigError("train.class_prompt: must not contain the token (it is the prior)")
        if self.device and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"train.device: cpu, cuda[:N] or mps (got {self.device!r})")

    def result_fields(self) -> dict:
        """The fields that decide the trained weights (a resumed run must match these)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_CONTROL}


# Named settings for a situation, in one place (the CLI's --preset, the demos). A preset only
# sets fields; whatever a caller also gives explicitly wins.
PRESETS: dict[str, dict[str, Any]] = {
    # A first result in minutes on 2 CPU cores: 128 px, 60 steps, a high learning rate so a
    # short run visibly moves the output, few and short class images, no activation
    # recomputation (it saves GPU memory and only costs time on a CPU). It shows the path, not
    # the quality: a real likeness needs the defaults (512 px, 800 steps) on a GPU.
    "cpu-quick": {
        "resolution": 128,
        "steps": 60,
        "learning_rate": 1e-2,
        "num_class_images": 8,
        "class_image_steps": 10,
        "gradient_checkpointing": "off",
        "checkpoint_every": 30,
    },
}


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    """The TrainConfig of preset ``name``, with ``overrides`` on top (they win)."""
    if name not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise ConfigError(f"train.preset: unknown preset {name!r} (known: {known})")
    return TrainConfig(**{**PRESETS[name], **overrides})
