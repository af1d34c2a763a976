"""Make sure the base weights are at the instance's shared path (the serving environment is
:func:`avatarforge.serving.bootstrap.ensure_env`'s: it is needed before this library can run).

The shared base model runs :func:`ensure_base` from ``initialize()`` (as does model_setup), so a
restarted or newly scaled-out instance works without anyone invoking model_setup first. Each
call is
- idempotent: a finished copy is recognised and reused;
- atomic: fetched and unpacked under a temporary name, hash-verified, then renamed into place;
- safe when several models start at once: one file lock per item, the loser of the race finds
  the winner's finished copy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock, Timeout

from ..base.identity import BaseInfo, read_base_info
from ..errors import AvatarforgeError
from ..storage import fetch, local_path
from .bootstrap import lock_folder

log = logging.getLogger(__name__)
LOCK_TIMEOUT_S = 1800  # a multi-GB base from S3 may take minutes; longer means a stuck peer


class SharedFilesError(AvatarforgeError, RuntimeError):
    """The shared files cannot be made present; the message says which and why."""


def _key(source: str) -> str:
    return "src-" + hashlib.sha256(source.encode()).hexdigest()[:16]


def _is_uri(source: str) -> bool:
    return "://" in source


def _lock(shared: Path, name: str) -> FileLock:
    return FileLock(str(lock_folder(shared) / f"{name}.lock"), timeout=LOCK_TIMEOUT_S)


def _fetch(source: str, dest: Path) -> Path:
    """A local tarball is read in place; an s3:// URI is downloaded by avatarforge.storage."""
    if not source.startswith("s3://"):
        return local_path(source).expanduser()
    return fetch(source, dest)


def _diffusers_root(folder: Path) -> Path:
    if (folder / "model_index.json").is_file():
        return folder
    found = [p for p in folder.iterdir() if (p / "model_index.json").is_file()]
    if len(found) != 1:
        raise SharedFilesError("base archive holds no single diffusers folder (model_index.json)")
    return found[0]


def _check_hash(info: BaseInfo, expected: str, source: str) -> None:
    if expected and info.content_hash != expected:
        raise SharedFilesError(
            f"base from {source} has content hash {info.content_hash[:12]}, "
            f"expected {expected[:12]}: wrong or corrupt base"
        )


def ensure_base(
    source: str,
    shared: Path,
    *,
    expected_hash: str = "",
    base_id: str = "",
    verify: bool = False,
) -> BaseInfo:
    """The base at ``shared/base/<content hash>``, fetched from ``source`` if not there yet.

    ``source``: a diffusers folder (linked, not copied: it is already local), a tarball path, a
    ``file://`` or ``s3://`` URI of a tarball holding one diffusers folder. Without
    ``expected_hash`` (model_setup) the hash found is remembered per source, so a later user
    model that names the hash finds the same copy.

    A copy is recognised by its files' sizes and times (hashing a multi-GB base on every call
    would cost seconds); ``verify`` (the shared base model, once per start) hashes every byte
    instead. A copy whose hash is not ``expected_hash`` is corrupt: it is discarded and fetched
    again from ``source`` once.
    """
    shared = Path(shared)
    root = shared / "base"
    alias = root / f"{_key(source)}.hash"
    if not expected_hash and alias.is_file():
        expected_hash = alias.read_text().strip()
    dest = root / expected_hash[:16] if expected_hash else None
    fetched = dest is None or not dest.exists()
    if fetched:
        if not source:
            raise SharedFilesError(
                f"base {base_id or expected_hash[:12]} is not under {root} and no source is "
                "configured (set AVATARFORGE_BASE_SOURCE to a folder, tarball or s3:// URI)"
            )
        root.mkdir(parents=True, exist_ok=True)
        try:
            with _lock(shared, f"base-{_key(source)}"):
                if dest is None or not dest.exists():  # a peer may have finished meanwhile
                    dest = _install_base(source, root, expected_hash, base_id)
        except Timeout:
            raise SharedFilesError(f"timed out waiting for a peer to fetch {source}") from None
    info = read_base_info(dest, base_id or None, verify=verify and not fetched)
    if expected_hash and info.content_hash != expected_hash and not fetched and source:
        log.warning("base at %s has hash %s, expected %s: corrupt; fetching it again from %s",
                    dest, info.content_hash[:12], expected_hash[:12], source)  # fmt: skip
        try:
            with _lock(shared, f"base-{_key(source)}"):
                _discard(dest)
                dest = _install_base(source, root, expected_hash, base_id)
        except Timeout:
            raise SharedFilesError(f"timed out waiting for a peer to fetch {source}") from None
        info, fetched = read_base_info(dest, base_id or None), True
    _check_hash(info, expected_hash, str(dest))
    if fetched:
        _write_atomic(alias, info.content_hash)
    return info


def ensure_folder(source: str, shared: Path, kind: str) -> Path:
    """A folder named by a setting: ``source`` itself when it is a local folder, else the
    tarball (a path, ``file://`` or ``s3://`` URI) extracted once into ``shared/<kind>/<key>``
    under a lock, so every model and restart of the instance finds the same copy."""
    local = Path(source).expanduser()
    if not _is_uri(source) and local.is_dir():
        return local
    dest = Path(shared) / kind / _key(source)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _lock(Path(shared), f"{kind}-{_key(source)}"):
            if not dest.is_dir():  # a peer may have finished meanwhile
                from ..safe_tar import safe_extract

                log.info("fetching %s %s into %s", kind, source, dest)
                tmp = Path(tempfile.mkdtemp(prefix=f".{kind}.partial-", dir=dest.parent))
                try:
                    safe_extract(_fetch(source, tmp / "archive.tar.gz"), tmp / "x")
                    entries = list((tmp / "x").iterdir())
                    # a tarball of one folder (as deploy packs it) stands for that folder
                    root = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp / "x"
                    os.replace(root, dest)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    except Timeout:
        raise SharedFilesError(f"timed out waiting for a peer to fetch {source}") from None
    return dest


def _discard(dest: Path) -> None:
    """Take a corrupt copy out of the way at once (a rename), then delete it."""
    if dest.is_symlink():
        dest.unlink()
        return
    aside = dest.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-corrupt-{dest.name}")
    os.replace(dest, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


PARTIAL_PREFIX = ".base.partial-"


def sweep_partials(root: Path) -> list[Path]:
    """Remove the unfinished base folders of processes that died (a crash or a kill during a
    fetch left them; each is named after its process); returns what was removed."""
    removed = []
    for path in Path(root).glob(PARTIAL_PREFIX + "*"):
        pid = path.name.removeprefix(PARTIAL_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d unfinished base folder(s) of dead processes", len(removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _install_base(source: str, root: Path, expected_hash: str, base_id: str) -> Path:
    log.info("fetching base %s into %s", source, root)
    sweep_partials(root)
    tmp = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{os.getpid()}-", dir=root))
    try:
        local = Path(source).expanduser()
        if not _is_uri(source) and local.is_dir():
            info = read_base_info(local, base_id or None)
            _check_hash(info, expected_hash, source)
            staged = tmp / "link"
            os.symlink(local.resolve(), staged)
        else:
            from ..safe_tar import safe_extract

            archive = _fetch(source, tmp / "base.tar.gz")
            safe_extract(archive, tmp / "x")
            staged = _diffusers_root(tmp / "x")
            info = read_base_info(staged, base_id or None)
            _check_hash(info, expected_hash, source)
        dest = root / info.content_hash[:16]
        try:
            os.replace(staged, dest)
        except OSError:
            if not dest.exists():  # else: the same base arrived from another source first
                raise
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
