"""sha256 of files, read in chunks so a multi-GB base or tarball never sits in memory."""

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
    digest = hashlib.sha256()
    update_from_file(digest, path)
    return digest.hexdigest()
