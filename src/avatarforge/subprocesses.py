"""Helpers for the servers we start as child processes."""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when we die, even by SIGKILL (Linux only).

    Our context managers always stop their servers; this covers the case where the Python
    process itself is killed, which would otherwise leave tritonserver or moto holding ports.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
