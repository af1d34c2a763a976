"""Replacing a folder without a moment in which it is missing (Linux: renameat2 EXCHANGE).

Folders we write whole (an adapter, a base, a checkpoint, an extracted archive) are built under
a temporary name beside their destination and then put in place. When the destination already
exists, deleting it and renaming the new one leaves an instant with no folder at all: a reader
(the shared base loading an adapter) or a crash in between finds nothing. ``renameat2`` with
``RENAME_EXCHANGE`` swaps the two names in one step; the old contents, now under the temporary
name, are deleted afterwards. Where the call is missing (not Linux, an old kernel, a file system
without it) the old folder is renamed aside first, the closest a plain rename gets.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import uuid
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically; False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    )
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # this kernel or file system has no exchange
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, dest: Path) -> Path:
    """Put the folder ``new`` at ``dest`` (same file system), replacing what is there; returns
    ``dest``. Readers see the old folder or the new one, never none (where the system can)."""
    new, dest = Path(new), Path(dest)
    if not dest.exists():
        try:
            os.rename(new, dest)
            return dest
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not dest.exists():
                raise  # else a peer put one there meanwhile: replace it below
    if _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # the old contents, now under the new name
        return dest
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dest, old)
    os.rename(new, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest
