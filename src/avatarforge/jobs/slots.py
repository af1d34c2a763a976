"""At most N jobs train at once on an instance; the others wait (they are never refused).

DJL runs several Python worker processes, and a local runner may use threads: the slots are
``flock`` locks on files ``slot-0.lock .. slot-<N-1>.lock`` in one folder, which exclude both
other processes and other open files of the same process. The kernel drops a lock when its
process dies, even by SIGKILL, so a killed job never keeps its slot.

:func:`job_lock` is the same mechanism for one job id: two submissions of one job never run
side by side on an instance; the second waits and then finds the first one's result.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import AvatarforgeError

log = logging.getLogger(__name__)
POLL_S = 0.2


class SlotTimeout(AvatarforgeError, TimeoutError):
    """No slot (or job lock) came free before the caller's deadline."""

    status = 504


@dataclass(frozen=True)
class Slot:
    index: int  # which slot, 0 .. count-1
    waited_s: float  # time spent waiting for it
    acquired_at: float  # time.time() when it was taken


def _try_lock(path: Path, owner: str) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None when someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # who holds it, for a person looking at the folder (the lock itself is the flock)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{owner} pid {os.getpid()}\n".encode(), 0)
    return fd


def _release(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(
    paths: list[Path],
    owner: str,
    timeout_s: float | None,
    on_wait: Callable[[], None] | None,
) -> tuple[int, int, float]:
    """(index, fd, waited seconds) of the first of ``paths`` that could be locked."""
    started = time.monotonic()
    waiting = False
    while True:
        for index, path in enumerate(paths):
            fd = _try_lock(path, owner)
            if fd is not None:
                return index, fd, time.monotonic() - started
        if not waiting:
            waiting = True
            if on_wait is not None:
                on_wait()
        if timeout_s is not None and time.monotonic() - started >= timeout_s:
            raise SlotTimeout(f"{owner}: nothing came free in {timeout_s:.0f} s")
        time.sleep(POLL_S)


@contextlib.contextmanager
def training_slot(
    slots_dir: Path,
    count: int,
    *,
    owner: str = "",
    timeout_s: float | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[Slot]:
    """Hold one of ``count`` training slots for the block; wait (polling) while all are taken.

    ``on_wait`` is called once when the caller has to wait; :class:`SlotTimeout` after
    ``timeout_s`` seconds of waiting.
    """
    slots_dir = Path(slots_dir)
    slots_dir.mkdir(parents=True, exist_ok=True)
    paths = [slots_dir / f"slot-{i}.lock" for i in range(count)]

    def waiting() -> None:
        log.info("%s: all %d training slots are busy; waiting for one", owner or "job", count)
        if on_wait is not None:
            on_wait()

    index, fd, waited = _acquire(paths, owner, timeout_s, waiting)
    slot = Slot(index, waited, time.time())
    log.info("%s: training slot %d of %d taken after %.1f s", owner or "job", index, count, waited)
    try:
        yield slot
    finally:
        _release(fd)


def _job_lock_path(slots_dir: Path, job_id: str) -> Path:
    folder = Path(slots_dir) / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{job_id}.lock"


def job_is_running(slots_dir: Path, job_id: str) -> bool:
    """True while some process on this instance holds the lock of ``job_id``."""
    fd = _try_lock(_job_lock_path(slots_dir, job_id), f"probe of job {job_id}")
    if fd is None:
        return True
    _release(fd)
    return False


@contextlib.contextmanager
def job_lock(
    slots_dir: Path,
    job_id: str,
    *,
    timeout_s: float | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[float]:
    """Hold the lock of ``job_id`` on this instance for the block; yields the seconds waited."""
    path = _job_lock_path(slots_dir, job_id)

    def waiting() -> None:
        log.info("job %s is already running here; waiting for it to finish", job_id)
        if on_wait is not None:
            on_wait()

    _, fd, waited = _acquire([path], f"job {job_id}", timeout_s, waiting)
    try:
        yield waited
    finally:
        _release(fd)
