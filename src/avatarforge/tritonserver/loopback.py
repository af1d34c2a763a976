"""Keep the tritonserver we start to ourselves: its listeners on loopback, its control key off
its command line, and a check of what it really listens on.

Triton's SageMaker front end binds every interface (no address option in 2.51) and has no
authentication: anyone who reaches the port can ``POST /models`` with any folder of the machine
(its model.py then runs as the server's user). Triton takes its control key
(:mod:`.control_key`) only as a command-line argument, which every local user can read in
/proc/PID/cmdline. So tritonserver is started with a small ``LD_PRELOAD`` library
(``data/loopback_bind.c``) that binds a fixed-port listener asked for on "any address" to
loopback instead, and puts the key into tritonserver's arguments from its environment.

The library is compiled with the system's C compiler, cached by its source's hash, and run
before every use (:func:`preload_library`): ld.so skips a library it cannot load with a message
and goes on, so a cached file that is not valid would leave the port open. One that fails is
built again; if that fails too, :class:`LoopbackError` says why and the launcher refuses to
start unless ``AVATARFORGE_ALLOW_EXPOSED_TRITON=1`` (:func:`exposure_allowed`).

After start, :func:`listening` reads what the server really listens on: its socket inodes
(/proc/PID/fd) matched in /proc/PID/net/tcp and tcp6. On SageMaker the platform owns the
container's network; none of this runs there.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from ..errors import AvatarforgeError
from ..netutil import free_port
from ..paths import build_dir

SOURCE = "loopback_bind.c"
KEY_ENV = "AVATARFORGE_TRITON_CONTROL_KEY"  # as loopback_bind.c names it
PLACEHOLDER = f"@{KEY_ENV}@"
ALLOW_EXPOSED_ENV = "AVATARFORGE_ALLOW_EXPOSED_TRITON"


class LoopbackError(AvatarforgeError, RuntimeError):
    """The preload library cannot be built, or does not do its job."""


def exposure_allowed() -> bool:
    """The operator's explicit opt-in to run tritonserver with a port open beyond loopback or
    its control key on its command line."""
    return os.environ.get(ALLOW_EXPOSED_ENV, "") == "1"


def _source() -> bytes:
    return resources.files("avatarforge").joinpath("data", SOURCE).read_bytes()


def library_path(cache: Path | None = None) -> Path:
    """Where the library for this source is cached (it may not exist yet)."""
    digest = hashlib.sha256(_source()).hexdigest()[:16]
    return (cache or build_dir() / "native") / f"loopback_bind-{digest}.so"


def preload_library(cache: Path | None = None) -> Path:
    """The library, built if needed, and seen to work just now."""
    target = library_path(cache)
    if target.is_file() and _problem(target) is None:
        return target
    _build(target)
    if problem := _problem(target):
        target.unlink(missing_ok=True)
        raise LoopbackError(f"{target.name} does not work: {problem}")
    return target


def _build(target: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise LoopbackError(f"no C compiler (cc) to build {SOURCE}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / SOURCE, Path(tmp) / target.name
        src.write_bytes(_source())
        done = subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise LoopbackError(f"could not build {SOURCE}: {done.stderr.strip()[-500:]}")
        out.replace(target)  # atomic: a concurrent builder's copy is identical


# Run under the library: an any-address bind must land on loopback, the placeholder must turn
# into the key, and neither variable may reach a child.
_PROBE = f"""
import os, socket, sys
s = socket.socket()
s.bind(("0.0.0.0", int(sys.argv[2])))
print(s.getsockname()[0], sys.argv[1], "LD_PRELOAD" in os.environ, {KEY_ENV!r} in os.environ)
"""


def _problem(library: Path) -> str | None:
    """None if ``library`` does its job in a process of its own, else what went wrong."""
    key = os.urandom(8).hex()
    expected = f"127.0.0.1 <{key}> False False"
    env = {"PATH": os.environ.get("PATH", ""), "LD_PRELOAD": str(library), KEY_ENV: key}
    for _ in range(3):  # the free port may be taken before the probe binds it
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _PROBE, f"<{PLACEHOLDER}>", str(free_port())],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        if "Address already in use" not in done.stderr:
            break
    if done.returncode == 0 and done.stdout.strip() == expected:
        return None
    return (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}")[-300:]


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on, from its own network
    namespace's tables; an exited process listens on nothing."""
    try:
        inodes = {
            link.removeprefix("socket:[").removesuffix("]")
            for fd in os.listdir(f"/proc/{pid}/fd")
            if (link := _readlink(f"/proc/{pid}/fd/{fd}")).startswith("socket:[")
        }
    except (FileNotFoundError, ProcessLookupError):
        return []
    found = []
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 in this kernel, or the process is gone
            continue
        for row in rows:
            fields = row.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN; [9]: the inode
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((str(ipaddress.ip_address(raw)), int(port, 16)))
    return found


def beyond_loopback(listeners: list[tuple[str, int]]) -> list[str]:
    """Those of ``listeners`` that another machine could reach, as "address:port"."""
    exposed = []
    for address, port in listeners:
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if not ip.is_loopback:
            exposed.append(f"{address}:{port}" if ip.version == 4 else f"[{address}]:{port}")
    return exposed


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed since listed
        return ""
