"""sha256 of files, read in chunks so a multi-GB base or tarball never sits in memory.

One file's hash is :func:`hashlib.file_digest`. A hash over several files (the base's content
hash: paths and bytes of every file in one digest) needs the bytes fed into a running digest,
which ``file_digest`` cannot do (it always starts a new one): :func:`update_from_file` does that.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def update_from_file(digest: hashlib._Hash, path: Path) -> None:
    """Feed ``path``'s bytes into ``digest`` (for hashes that cover several files)."""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
