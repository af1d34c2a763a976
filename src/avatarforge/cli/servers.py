"""What the commands that run servers share: free ports and the options that move them, SIGTERM
unwinding like Ctrl-C, one-line output, the servers' instance environment."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import NoReturn

from ..paths import build_dir
from .common import console, fail


def say(text: str) -> None:
    """One line, never wrapped (scripts and tests read the URLs)."""
    console.print(text, soft_wrap=True, highlight=False)


def usable_port(port: int, what: str, options: dict[str, str], host: str = "127.0.0.1") -> int:
    """``port`` if nothing listens on it (else a clear error naming its option in
    ``options``, by ``what``), or a free one for 0."""
    from ..netutil import free_port
    from ..tritonserver.launch import PortInUseError, check_port_free

    if port == 0:
        return free_port()
    try:
        check_port_free(port, what, host)
    except PortInUseError as exc:
        port_in_use(exc, options)
    return port


def port_in_use(exc, options: dict[str, str]) -> NoReturn:
    """Fail with the port, what it is for and the option that moves it."""
    option = options.get(exc.what, "")
    fail(
        f"{exc}: stop what listens there or choose another port with {option} N (0: any free port)"
    )


def instance_env(base: str, shared_dir: Path | None) -> dict[str, str]:
    """The server environment the models' ensure-step reads: shared files, base source, and
    this interpreter's environment as the shared base's serving env."""
    from ..base.config import BaseConfig, resolve_base
    from ..serving.config import local_instance_env

    # a folder or tarball is used as is: the ensure-step verifies the hash
    source = str(resolve_base(BaseConfig()).path) if base == "tiny" else base
    return local_instance_env(source, shared_dir or build_dir() / "triton" / "shared")


def stop_on_sigterm() -> None:
    """SIGTERM (kill, a supervisor) unwinds like Ctrl-C, so the servers are always stopped."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt
