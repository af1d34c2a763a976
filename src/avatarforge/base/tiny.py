"""The embedded tiny base, built from configs, not downloaded.

A seeded, random, tiny model with the Stable Diffusion 2.1 architecture (UNet with linear
projection and cross attention, a VAE with SD's x8 downsampling, an OpenCLIP-style text encoder,
the real CLIP BPE vocabulary from the open-clip-torch wheel, SD2's "!" pad token) saved as an
ordinary diffusers folder (:func:`~.build.build_base_folder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .build import build_base_folder, sd21_scheduler
from .identity import BaseInfo

TINY_ID_PREFIX = "avatarforge/tiny-sd21"


def _tiny_components(seed: int) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,  # 512 px / 8, as SD 2.1-base
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # four blocks -> the x8 latent downsampling of SD's VAE
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",  # OpenCLIP ViT-H, as SD 2.x
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": sd21_scheduler()}


def build_tiny_base(out: Path, seed: int = 0, *, force: bool = False) -> BaseInfo:
    """Build the embedded base into ``out`` (atomically). Same seed -> same bytes."""
    return build_base_folder(
        out, f"{TINY_ID_PREFIX}@seed{seed}", lambda: _tiny_components(seed), force=force
    )
