"""Keep tritonserver's SageMaker listener on loopback in the local MME.

Triton's SageMaker front end binds every interface (no address option in 2.51) and has no
authentication: anyone who reaches the port can ``POST /models`` with any folder of the machine
(its model.py then runs as the server's user) or invoke a model directly, around our loader's
checks. Locally only our loader talks to it, so tritonserver is started with a small
``LD_PRELOAD`` library (``data/loopback_bind.c``) that binds a fixed-port listener asked for on
"any address" to loopback instead. It is compiled on first use with the system's C compiler and
cached by its source's hash; with no compiler the MME still runs and says, once, that the port
is open to the network. On SageMaker the platform owns the container's network.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from ..paths import build_dir

log = logging.getLogger(__name__)

SOURCE = "loopback_bind.c"


def _source() -> bytes:
    return resources.files("avatarforge").joinpath("data", SOURCE).read_bytes()


def preload_library(cache: Path | None = None) -> Path | None:
    """The compiled library (built once per source version), or None when no C compiler
    exists here (logged as a warning with what it means)."""
    source = _source()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = (cache or build_dir() / "native") / f"loopback_bind-{digest}.so"
    if target.is_file():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        log.warning(
            "no C compiler: tritonserver's SageMaker port listens on every interface, "
            "unauthenticated (install cc to keep it on loopback; firewall it meanwhile)"
        )
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / SOURCE, Path(tmp) / target.name
        src.write_bytes(source)
        done = subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            log.warning("could not build %s (%s): the SageMaker port is not kept on loopback",
                        SOURCE, done.stderr.strip()[-500:])  # fmt: skip
            return None
        out.replace(target)  # atomic: a concurrent builder's copy is identical
    return target


def loopback_env(cache: Path | None = None) -> dict[str, str]:
    """Environment for tritonserver that keeps its any-address listeners on loopback."""
    library = preload_library(cache)
    return {"LD_PRELOAD": str(library)} if library else {}
