"""What the models of a running tritonserver cost: its python backend stub processes (Linux).

Each model instance of the python backend is its own ``triton_python_backend_stub`` process,
a child of tritonserver. What a resident user costs the instance is that process's private
memory (``Private_Dirty`` in ``/proc/<pid>/smaps_rollup``: pages no other process shares),
not the few MiB of its adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STUB_NAME = "triton_python_backend_stub"


@dataclass(frozen=True)
class StubProcess:
    pid: int
    model_file: Path  # the model.py it runs
    instance: str  # Triton's instance name: <model>_<group>_<index>

    def private_dirty_bytes(self) -> int:
        return private_dirty_bytes(self.pid)

    def maps_library(self, fragment: str) -> bool:
        """Whether a file whose path contains ``fragment`` is mapped (e.g. "libtorch")."""
        try:
            return fragment in Path(f"/proc/{self.pid}/maps").read_text()
        except OSError:
            return False

    def environ(self) -> dict[str, str]:
        raw = Path(f"/proc/{self.pid}/environ").read_bytes()
        pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def stub_processes(server_pid: int) -> list[StubProcess]:
    """The stub processes whose parent is the tritonserver ``server_pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if parent != server_pid or not argv or not argv[0].endswith(STUB_NAME.encode()):
            continue
        # argv: stub, model.py, shm region, sizes, parent pid, backend dir, ipc size, instance
        found.append(StubProcess(int(entry), Path(argv[1].decode()), argv[8].decode()))
    return sorted(found, key=lambda s: s.pid)


def private_dirty_bytes(pid: int) -> int:
    """Private_Dirty of ``pid`` (from smaps_rollup), in bytes."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no Private_Dirty in /proc/{pid}/smaps_rollup")
