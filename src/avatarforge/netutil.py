"""Loopback helpers for the local servers we start (tritonserver, moto, the MME front)."""

from __future__ import annotations

import http.client
import socket
import subprocess
import time
import urllib.request


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it; a race with other starters is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until_http_ok(
    url: str, process: subprocess.Popen, timeout: float, *, what: str = "server"
) -> None:
    """Poll ``url`` until it answers 200.

    Raises RuntimeError as soon as ``process`` exits (no point waiting for a dead server) and
    TimeoutError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} at start")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (OSError, http.client.HTTPException):
            pass  # not listening yet, or an error status while it starts
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} did not answer on {url} within {timeout:.0f} s")
        time.sleep(0.1)
