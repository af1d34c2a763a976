"""The key that opens the APIs that change a tritonserver we start.

Triton's repository API loads a model from a config and files sent in the request
(``POST /v2/repository/models/<m>/load`` with ``file:1/model.py``): whoever reaches the HTTP or
gRPC port runs code as the server's user. That includes a web page in the user's browser: a
``text/plain`` POST needs no CORS preflight, and Triton reads the body whatever its type.
tritonserver 2.51 can restrict groups of APIs to requests that carry a header
(``--http-restricted-api=<apis>:<key>=<value>``, refused with HTTP 403;
``--grpc-restricted-protocol=<apis>:<key>=<value>``, metadata key
``triton-grpc-protocol-<key>``, refused with UNAVAILABLE; src/command_line_parser.cc,
src/http_server.cc ``RespondIfRestricted``, src/grpc/grpc_server.cc ``ExecutePrecondition``).

Restricted here: every group that changes the server: the model repository (index, load,
unload), shared memory, trace and log settings. Inference, health, metadata, model configs and
statistics stay open: they are what clients use, and change nothing. The python backend's
``pb_utils.load_model`` (how user models start the shared base) goes through Triton's C API,
not HTTP, and needs no key.

Each server start gets a new random key; the launcher writes it to
``build/triton/keys/<HTTP port>`` (mode 0600, in a 0700 folder) for our CLI (``serve load``)
and removes it at stop. It never appears on a command line (see :mod:`.loopback`).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from ..errors import AvatarforgeError
from ..paths import build_dir

HEADER = "avatarforge-control-key"
RESTRICTED = ("model-repository", "shared-memory", "trace", "logging")


class ControlKeyError(AvatarforgeError, RuntimeError):
    """No usable control key for a server: missing, or readable by others."""


def new_key() -> str:
    return secrets.token_urlsafe(32)


def restrict_args(value: str, *, grpc: bool) -> list[str]:
    """tritonserver's flags that close :data:`RESTRICTED` to requests without the key
    (``value``: the key, or the placeholder the preload library replaces)."""
    rule = f"{','.join(RESTRICTED)}:{HEADER}={value}"
    return [f"--http-restricted-api={rule}", *([f"--grpc-restricted-protocol={rule}"] * grpc)]


def headers(key: str) -> dict[str, str]:
    """The HTTP header a request to a restricted API sends."""
    return {HEADER: key}


def grpc_headers(key: str) -> dict[str, str]:
    """gRPC metadata for a restricted API (Triton prefixes the configured key)."""
    return {f"triton-grpc-protocol-{HEADER}": key}


def key_file(http_port: int) -> Path:
    return build_dir() / "triton" / "keys" / str(http_port)


def write_key(path: Path, key: str) -> None:
    """Write ``key`` where only this user can read it (a 0700 folder, a 0600 file, replaced
    atomically)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)  # mkdir's mode is masked, and the folder may be older
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    os.replace(tmp, path)


def read_key(http_port: int) -> str:
    """The key of the server we started on ``http_port`` (from this checkout's build folder)."""
    path = key_file(http_port)
    try:
        info = path.stat()
        key = path.read_text().strip()
    except FileNotFoundError:
        raise ControlKeyError(
            f"no control key for a tritonserver on port {http_port} ({path}): only a server "
            "started by `avatarforge serve local-triton` with this build folder can be changed"
        ) from None
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise ControlKeyError(f"{path} must be this user's and mode 0600; not used")
    return key
