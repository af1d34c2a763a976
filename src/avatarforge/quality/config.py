"""EvalConfig: what `avatarforge eval` generates and how it judges it."""

from __future__ import annotations

from dataclasses import dataclass

from ..generate import SCHEDULERS
from ..settings import ConfigError, Settings, setting
from .embedding import THRESHOLD
from .prompts import TEMPLATES


@dataclass
class EvalConfig(Settings):
    section = "eval"
    prompts: int = setting(
        4,
        "templates of the fixed prompt set used; each runs with the token (identity) and "
        "without it (leakage)",
        ge=1,
        le=len(TEMPLATES),
    )
    seeds: int = setting(2, "images per prompt (seeds seed, seed+1, ...)", ge=1, le=16)
    seed: int = setting(0, "first seed: the prompt set is fixed, so scores compare", ge=0)
    steps: int = setting(30, "denoising steps per image", ge=1, le=150)
    guidance_scale: float = setting(7.5, "classifier-free guidance scale", ge=0.0, le=30.0)
    size: int = setting(512, "image side in pixels (multiple of 8)", ge=64, le=1024)
    scheduler: str = setting("ddim", "sampler", choices=tuple(SCHEDULERS))
    threshold: float = setting(
        THRESHOLD, "face distance at or below which two faces are one person (dlib's 0.6)",
        ge=0.0, le=2.0,
    )  # fmt: skip
    max_references: int = setting(
        12, "most of the user's kept photos compared with (one per source photo)", ge=1, le=100
    )
    upsample: int = setting(
        1, "face detector upsampling on generated images (finds smaller faces)", ge=0, le=3
    )
    device: str = setting("", "torch device ('': cuda when available, else cpu)")

    def validate(self) -> None:
        if self.size % 8:
            raise ConfigError(f"eval.size: must be a multiple of 8 (got {self.size})")
