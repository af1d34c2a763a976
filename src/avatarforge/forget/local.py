"""A user's files in the build folder: every place a command writes them by default.

Entries are matched by their exact name, read from the folder (never by building a path and
asking if it exists: on a case-insensitive file system ``users/Al`` would find ``users/al``),
and never by a bare string prefix (``al`` must not match ``alice``). Left-overs of interrupted
writers are matched by the exact shape their writer gives them (``.<name>-`` + tempfile's 8
characters). A symlink is removed, never followed.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..mme.loader import STAGING_PREFIX, model_hash
from ..names import check_user_id
from ..paths import build_dir
from ..serving.package_check import CHECKSUM_SUFFIX
from .report import DELETED, FAILED, Report, size_text

WHERE = "build"
_TEMP = "[a-z0-9_]{8}"  # tempfile's names: 8 of "a-z0-9_" after the prefix


def _exact(name: str) -> str:
    return re.escape(name)


def _temp(name: str) -> str:
    """What ``tempfile.mkdtemp(prefix=f".{name}-")`` (or mkstemp) names, and nothing else."""
    return rf"\.{re.escape(name)}-{_TEMP}"


def places(user: str, root: Path) -> Iterator[tuple[str, Path, str]]:
    """(what, folder, regex of entry names) for every default location of the user's files."""
    u = re.escape(user)
    package = f"{user}.tar.gz"
    yield "photos", root / "photos", _exact(user)  # docs/privacy.md: build/photos/<user>/
    yield "dataset", root / "datasets", _exact(user)  # preprocess OUT_DIR; eval's default
    yield "training output", root / "users", _exact(user)  # adapter, checkpoints, train log
    yield "package", root / "package", _exact(package)
    yield "package digest", root / "package", _exact(package + CHECKSUM_SUFFIX)
    yield "package (interrupted)", root / "package", _temp(user)  # package_user's staging
    for folder in _subfolders(root / "export"):  # export/<format>/<user>.safetensors
        yield "export", folder, _exact(f"{user}.safetensors")
        yield "export (interrupted)", folder, _temp(f"{user}.safetensors")
    yield "generated images", root / "generate", _exact(user)  # generate --url/--mme/--endpoint
    yield "generated images", root / "generate-local", _exact(user)  # the adapter's folder name
    yield "avatars", root / "avatars", _exact(user)  # its temp folders are inside
    yield "eval report", root / "eval", f"{_exact(user)}|{_temp(user)}"
    for folder in _subfolders(root / "triton", "repository-"):  # local-triton's, one per port
        yield "triton repository", folder, _exact(user)
        yield "triton repository (staging)", folder, rf"\.{u}\.(loading|previous)-\d+"
        yield "triton repository (staging)", folder, rf"\.{u}\.tar\.gz\.unpacked"
    digest = model_hash(package)  # the local MME untars <user>.tar.gz to models/<hash>/
    staging = rf"{re.escape(STAGING_PREFIX + digest)}-[0-9a-f]{{8}}"  # a load under way
    yield "MME model files", root / "mme" / "models", f"{digest}|{staging}"


def _subfolders(folder: Path, prefix: str = "") -> list[Path]:
    try:
        return sorted(
            p
            for p in folder.iterdir()
            if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()
        )
    except (FileNotFoundError, NotADirectoryError):
        return []


def _entries(folder: Path, pattern: str) -> list[Path]:
    regex = re.compile(pattern)
    try:
        return sorted(p for p in folder.iterdir() if regex.fullmatch(p.name))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _measure(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path`` (links counted, not followed)."""
    if path.is_symlink() or not path.is_dir():
        return 1, path.lstat().st_size
    files = size = 0
    for folder, _, names in os.walk(path):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(folder, name)).st_size
    return files, size


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def forget_local(user: str, report: Report, root: Path | None = None) -> None:
    """Delete the user's files under the build folder (``root``, default :func:`build_dir`)
    and add each to ``report`` (a dry run only adds them)."""
    check_user_id(user)
    root = Path(root or build_dir())
    seen: set[Path] = set()
    for what, folder, pattern in places(user, root):
        for path in _entries(folder, pattern):
            if path in seen:
                continue
            seen.add(path)
            try:
                amount = size_text(*_measure(path))
                if not report.dry_run:
                    _remove(path)
            except OSError as exc:
                report.add(WHERE, what, str(path), FAILED, f"{type(exc).__name__}: {exc}")
                continue
            report.add(WHERE, what, str(path), DELETED, amount)
    if any((root / "class-images").glob("*/info.json")):
        report.note(
            f"class images ({root / 'class-images'}) are kept: they are made by the base from "
            "the class prompt, shared by every user, and hold nobody's photos"
        )
