"""A moto server extended for the deploy tests (see launcher.py for what is added and why)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from avatarforge.testing.aws_local import moto_server

LAUNCHER = Path(__file__).with_name("launcher.py")


def extended_moto_server(
    *, start_timeout: float = 30.0, log_path: Path | None = None
) -> contextlib.AbstractContextManager[str]:
    """Run the extended moto server on a free loopback port; yields its endpoint URL."""
    command = [sys.executable, str(LAUNCHER)]
    return moto_server(start_timeout=start_timeout, log_path=log_path, command=command)
