"""The full-size base: Stable Diffusion 2.1-base's architecture with random weights.

For memory, shape and GPU timing work where the tiny base says nothing: the real SD 2.1-base
(512 px, epsilon) UNet (865.9M parameters), VAE (83.7M) and OpenCLIP ViT-H text encoder
(340.4M), built from configs — no download — with SD 2.x's tokenizer and DDIM scheduler from
:mod:`avatarforge.base.build`. Saved as an ordinary diffusers folder with a ``BaseInfo`` identity
(``avatarforge/full-sd21@seed<N>`` + content hash), so training and serving load it as any base.

Random weights are seeded, but CPU and CUDA draw different numbers: a base built on a GPU has
another content hash than one built on a CPU (adapters check the hash, so they never mix).
Default initialisation keeps activations small (largest |x| measured: ~11), so fp16 does not
overflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base.build import build_base_folder, sd21_scheduler
from .base.identity import BaseInfo
from .paths import build_dir

FULL_ID_PREFIX = "avatarforge/full-sd21"

# SD 2.1-base's configs (stabilityai/stable-diffusion-2-1-base), the fields that set shapes.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,  # 512 px / 8
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
TEXT_ENCODER_CONFIG: dict[str, Any] = {  # OpenCLIP ViT-H/14 without its last layer, as SD 2.x
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 0,
}
# What those configs make (the counts of the published SD 2.1 checkpoints).
PARAM_COUNTS = {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}


def full_base_dir() -> Path:
    return build_dir() / "base" / "full-sd21"


def _dtype(dtype, device: str):
    import torch

    if dtype is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def full_components(seed: int = 0, device: str = "cpu", dtype=None) -> dict[str, Any]:
    """unet, vae, text_encoder and scheduler of SD 2.1-base, random, made directly on ``device``.

    Modules are constructed under ``torch.device(device)``, so their initialisation runs there
    (seconds on a GPU; ~30 s on 2 CPU cores; nothing on "meta", which allocates no memory and
    serves to count parameters). ``dtype``: default fp16 on CUDA, fp32 elsewhere; the weights are
    drawn in fp32 and then cast.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .base.logs import quiet_hf

    quiet_hf()  # diffusers warns on every .to(dtype) of a model built without from_pretrained
    dtype = _dtype(dtype, device)
    with torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG).to(dtype)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**VAE_CONFIG).to(dtype)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)).to(dtype)
    for model in (unet, vae, text_encoder):
        model.eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": sd21_scheduler()}


def param_counts(components: dict[str, Any]) -> dict[str, int]:
    """Parameters per model component (works on "meta" components)."""
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in components.items()
        if hasattr(module, "parameters")
    }


def build_full_base(
    out: Path | None = None,
    seed: int = 0,
    *,
    device: str | None = None,
    save_dtype: str = "float16",
    force: bool = False,
    bpe: Path | None = None,
) -> BaseInfo:
    """The full-size base as a diffusers folder (default ``build_dir()/base/full-sd21``), built
    once, atomically, and reused while it holds the same id.

    ``device``: where the random weights are drawn (default: CUDA when available — seconds instead
    of half a minute). Saved in ``save_dtype`` (fp16: 2.6 GB on disk, as SD 2.1's fp16 variant;
    loaders cast to what they run in). ``bpe``: the CLIP BPE vocabulary file where the
    open-clip-torch wheel is not installed (see
    :func:`avatarforge.base.build.clip_vocab_and_merges`).
    """
    from .base.pipeline import best_device

    device = device or best_device()

    def components() -> dict[str, Any]:
        return full_components(seed, device, save_dtype)

    return build_base_folder(
        out or full_base_dir(), f"{FULL_ID_PREFIX}@seed{seed}", components, force=force, bpe=bpe
    )


# ---------------------------------------------------------------- adapters without training


def random_adapter(
    base: BaseInfo,
    adapter_dir: Path,
    seed: int,
    *,
    unet_rank: int = 8,
    unet_alpha: float = 8.0,
    text_encoder_rank: int = 8,
    text_encoder_alpha: float = 8.0,
    weight_std: float = 0.01,
) -> Path:
    """An adapter in the one format (:func:`avatarforge.adapter.save_adapter`) with the layers
    training adds (:func:`avatarforge.train.lora.add_lora`) and seeded random, non-zero weights.

    For benchmarks of loading, switching and serving at any base size without a training run:
    the models are built on the "meta" device from the base's configs (no memory, no weights
    read); A is drawn as peft's gaussian init (std 1/rank) and B with ``weight_std`` (training
    starts B at zero, which would make every adapter the identity). Another seed, another adapter.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from .adapter import AdapterMetadata, save_adapter
    from .train.config import TrainConfig
    from .train.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, adapter_config_dict, add_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(base.path, subfolder="unet")
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig.from_pretrained(base.path, subfolder="text_encoder")
        )
    add_lora(
        unet,
        text_encoder,
        unet_rank=unet_rank,
        unet_alpha=unet_alpha,
        text_encoder_rank=text_encoder_rank,
        text_encoder_alpha=text_encoder_alpha,
    )
    generator = torch.Generator().manual_seed(seed)

    def draw(model, rank: int) -> dict[str, Any]:
        from peft.utils import get_peft_model_state_dict

        shapes = get_peft_model_state_dict(model, save_embedding_layers=False)
        state = {}
        for key in sorted(shapes):  # sorted: the draw order must not depend on dict order
            std = 1.0 / rank if "lora_A" in key else weight_std
            state[key] = torch.randn(shapes[key].shape, generator=generator) * std
        return convert_state_dict_to_diffusers(state)

    defaults = TrainConfig()
    metadata = AdapterMetadata(
        base_id=base.base_id,
        base_hash=base.content_hash,
        unet_rank=unet_rank,
        unet_alpha=unet_alpha,
        text_encoder_rank=text_encoder_rank,
        text_encoder_alpha=text_encoder_alpha,
        token=defaults.token,
        instance_prompt=defaults.instance_prompt,
        class_prompt=defaults.class_prompt,
        steps=0,
        dataset_hash="",
        trainer_version="avatarforge.fullsize.random_adapter",
        seed=seed,
        extra={
            "random": f"gaussian A (std 1/rank), B (std {weight_std}); not trained",
            "unet_targets": list(UNET_TARGETS),
            "text_encoder_targets": list(TEXT_ENCODER_TARGETS),
        },
    )
    return save_adapter(
        Path(adapter_dir),
        draw(unet, unet_rank),
        draw(text_encoder, text_encoder_rank),
        metadata,
        unet_lora_config=adapter_config_dict(unet),
        text_encoder_lora_config=adapter_config_dict(text_encoder),
    )
