"""Which base a step uses (:class:`BaseConfig`) and :func:`resolve_base`, which finds it: the
embedded tiny base (built on first use), a local diffusers folder, or a hub id (downloaded only
when allowed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..paths import tiny_base_dir
from ..settings import ConfigError, Settings, setting
from .hub import download
from .identity import BaseError, BaseInfo, read_base_info
from .tiny import build_tiny_base

TINY = "tiny"


@dataclass
class BaseConfig(Settings):
    section = "base"
    base: str = setting(
        TINY,
        "'tiny' (the embedded random SD 2.1-shaped base), a local diffusers folder, "
        "or a hub id such as stabilityai/stable-diffusion-2-1-base (needs allow_download)",
    )
    seed: int = setting(0, "seed of the embedded tiny base's random weights", ge=0)
    allow_download: bool = setting(
        False, "allow fetching a hub id; nothing is downloaded unless this is set"
    )

    def validate(self) -> None:
        if not self.base:
            raise ConfigError("base.base: must name 'tiny', a folder or a hub id")


def resolve_base(config: BaseConfig | None = None) -> BaseInfo:
    """Find (or build, for 'tiny') the configured base and return its identity."""
    config = config or BaseConfig()
    if config.base == TINY:
        return build_tiny_base(tiny_base_dir(), seed=config.seed)
    path = Path(config.base).expanduser()
    if path.exists():
        return read_base_info(path)
    if not config.allow_download:
        raise BaseError(
            f"base {config.base!r} is not a local folder: import it (`avatarforge base import "
            f"{config.base}`: a hub id in the local hub cache) and give the folder it writes; "
            "nothing is downloaded unless allow_download is set"
        )
    return read_base_info(download(config.base), base_id=config.base)
