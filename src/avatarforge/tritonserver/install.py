"""Where the real tritonserver is: the binary, the python backend and its stub for this Python,
all from the nvidia-pytriton wheel; :func:`backend_dir` lays out the backend folder the server
is given."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..paths import build_dir


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    python_backend: Path  # backends/python: libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version
    libs: Path  # nvidia_pytriton.libs, for LD_LIBRARY_PATH


def find_tritonserver(python_version: str | None = None) -> TritonInstall:
    """Paths inside the installed nvidia-pytriton wheel; FileNotFoundError says what is missing."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nvidia-pytriton is not installed (run `make setup`)")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=root.parent.parent / "nvidia_pytriton.libs",
    )
    for path in (install.binary, install.python_backend, install.stub, install.libs):
        if not path.exists():
            raise FileNotFoundError(f"tritonserver part missing: {path}")
    return install


def backend_dir(install: TritonInstall | None = None) -> Path:
    """backends/python with the stub for this Python (the wheel keeps stubs apart)."""
    install = install or find_tritonserver()
    python = build_dir() / "triton" / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for target in (
        install.python_backend / "libtriton_python.so",
        install.python_backend / "triton_python_backend_utils.py",
        install.stub,
    ):
        link = python / target.name
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        tmp = python / f".{target.name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)  # atomic: parallel starts never see a missing file
    return python.parent
