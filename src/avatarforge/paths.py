"""Where generated things go. Everything lives under build/ (git-ignored)."""

from __future__ import annotations

import os
from pathlib import Path


def build_dir() -> Path:
    """The build folder: $AVATARFORGE_BUILD, or ./build."""
    return Path(os.environ.get("AVATARFORGE_BUILD", "build")).resolve()


def tiny_base_dir() -> Path:
    return build_dir() / "base" / "tiny-sd21"
