"""How torch's CPU threads wait, set before torch loads in a process of ours.

On a CPU, torch's OpenMP threads wait for each other at every parallel region; spinning (the
default) is catastrophic on a CPU shared with other work, where a waiting thread spins while
the one it waits for is descheduled. The tiny base's 256 px, 12-step image on a 2-core CPU,
median of 3: 0.8 s on one thread, 5.7 s on two spinning threads beside others' load (load
average ~2.5), 90 s beside two busy loops as well; waiting passively, two threads: 0.7 s and
1.5 s (`avatarforge demo` beside two busy loops: 368 s -> 85 s). OpenMP reads the setting when
torch loads, so it is set first: by the CLI for every command, and by the shared base (in
tritonserver's python stub) before it loads its pipeline. The environment's own value wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CPU_THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def quiet_cpu_threads(environ: MutableMapping[str, str] | None = None) -> None:
    """Make torch's CPU threads, once it loads in this process, wait without spinning
    (:data:`CPU_THREAD_ENV`, unless the environment sets them)."""
    environ = os.environ if environ is None else environ
    for name, value in CPU_THREAD_ENV.items():
        environ.setdefault(name, value)
