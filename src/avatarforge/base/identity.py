"""What identifies a base: its id and a content hash of its weights.

Adapters record a base's :class:`BaseInfo`; loaders compare it (:func:`check_same_base`), so an
adapter is never applied to a base it was not trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AvatarforgeError
from ..hashing import update_from_file

INFO_FILE = "avatarforge_base.json"


class BaseError(AvatarforgeError, RuntimeError):
    """The base model cannot be found, built or trusted."""


@dataclass(frozen=True)
class BaseInfo:
    """What identifies a base: adapters record it, loaders compare it."""

    base_id: str
    content_hash: str
    path: Path

    def to_dict(self) -> dict[str, str]:
        return {"base_id": self.base_id, "content_hash": self.content_hash, "path": str(self.path)}


def _weight_files(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != INFO_FILE]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def content_hash(folder: Path) -> str:
    """sha256 over every file's relative path and bytes (our own info file excluded)."""
    h = hashlib.sha256()
    for f in _weight_files(folder):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0")
        update_from_file(h, f)
        h.update(b"\0")
    return h.hexdigest()


def _stamp(folder: Path) -> list[list[Any]]:
    # Cheap fingerprint so a multi-GB base is hashed once, not on every load.
    return [
        [f.relative_to(folder).as_posix(), (st := f.stat()).st_size, st.st_mtime_ns]
        for f in _weight_files(folder)
    ]


def read_base_info(folder: Path, base_id: str | None = None, *, verify: bool = False) -> BaseInfo:
    """The BaseInfo of a diffusers folder, hashing it only when its files changed (their sizes
    and times), or always with ``verify``: a change that keeps both is then seen too."""
    folder = Path(folder).resolve()
    if not (folder / "model_index.json").is_file():
        raise BaseError(f"{folder} is not a diffusers model folder (no model_index.json)")
    info_path = folder / INFO_FILE
    recorded: dict[str, Any] = {}
    if info_path.is_file():
        # only a cache of the hash: an unreadable one is rebuilt, not fatal
        with contextlib.suppress(OSError, ValueError):
            recorded = json.loads(info_path.read_text())
        if not isinstance(recorded, dict):
            recorded = {}
    stamp = _stamp(folder)
    if verify or recorded.get("stamp") != stamp or "content_hash" not in recorded:
        recorded["content_hash"] = content_hash(folder)
        recorded["stamp"] = stamp
        recorded.setdefault("base_id", base_id or str(folder))
        # a read-only base is fine: it is hashed again next time
        with contextlib.suppress(OSError):
            info_path.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    return BaseInfo(base_id or recorded["base_id"], recorded["content_hash"], folder)


def record_base_info(folder: Path, base_id: str, digest: str, **extra: Any) -> None:
    """Record ``digest`` (the :func:`content_hash` just computed) as the folder's hash, with
    the stamp that lets :func:`read_base_info` trust it, and ``extra`` facts beside it."""
    folder = Path(folder)
    record = {**extra, "base_id": base_id, "content_hash": digest, "stamp": _stamp(folder)}
    (folder / INFO_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def check_same_base(expected: dict[str, Any], actual: BaseInfo) -> None:
    """Refuse an adapter trained on another base (the reference implementation's fault)."""
    if expected.get("base_hash") != actual.content_hash:
        raise BaseError(
            "adapter was trained on base "
            f"{expected.get('base_id')!r} (hash {str(expected.get('base_hash'))[:12]}), "
            f"but the serving base is {actual.base_id!r} (hash {actual.content_hash[:12]}); "
            "an adapter only works on the base it was trained on"
        )
