"""Locate the real tritonserver binary that ships in the nvidia-pytriton wheel."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path


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
