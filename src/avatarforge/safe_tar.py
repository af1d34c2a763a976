"""Tar archives we unpack from elsewhere, checked; tar archives we make, byte-for-byte reproducible.

:func:`safe_extract` never calls ``extractall``: every header is checked first (paths, member
types, declared sizes, member count; the length and depth of a name and the size of a pax
header before either is parsed) so a refused archive writes nothing; then regular files are
copied out while their bytes are counted (a sparse or lying member cannot pass the size limits),
into a temporary folder beside ``dest`` that is renamed into place only when all went well.

:func:`write_reproducible_tar` makes the archives we ship (per-user models, environments): same
input folder, same bytes — sorted members, fixed mtimes, root owners, normalised modes, and a
gzip header without timestamp or file name.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import uuid
import zlib
from pathlib import Path, PurePosixPath

from .errors import AvatarforgeError
from .fsutil import replace_dir

MAX_MEMBER_BYTES = 2 * 1024**3  # one LoRA adapter is < 100 MB; base weights are a few GB
MAX_TOTAL_BYTES = 8 * 1024**3
MAX_MEMBERS = 10_000
# Names: ours are a few parts deep (<user>/1/adapter/<file>, a diffusers base's <part>/<file>).
# Bounded before a name is split, so a tiny archive cannot cost memory or time that grows
# with its depth (a name 32,000 folders deep took 3.9 GB).
MAX_NAME_BYTES = 1024
MAX_DEPTH = 32  # parts of a member's path
MAX_PART_BYTES = 255  # NAME_MAX of Linux file systems
# pax and GNU long-name headers: tarfile reads each whole, and follows a chain of them by
# recursion; a member needs one or two (a global header, its own).
MAX_EXTENDED_HEADER_BYTES = 64 * 1024
MAX_EXTENDED_IN_A_ROW = 8
FIXED_MTIME = 0  # the epoch: archives carry no build time
_CHUNK = 1024 * 1024
# What reading a corrupt archive raises: tarfile's errors, and its decompressors' own
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


class UnsafeArchiveError(AvatarforgeError, ValueError):
    """The archive was refused; the message names the member and the reason."""

    status = 400


def safe_extract(
    tar_path: Path,
    dest: Path,
    *,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_members: int = MAX_MEMBERS,
    overwrite: bool = False,
) -> list[Path]:
    """Extract ``tar_path`` (any compression tarfile reads) into the new folder ``dest``.

    Only regular files and folders with relative paths are accepted; links, devices, FIFOs,
    absolute paths, ``..``, duplicate names (or one path as a file and a folder), oversized
    members, too many members or too many bytes in total, and corrupt data raise
    :class:`UnsafeArchiveError` and leave nothing behind. ``dest`` must not
    exist unless ``overwrite`` (then it is replaced only after the new contents are complete).
    Returns the extracted files (not folders) in archive order.
    """
    tar_path, dest = Path(tar_path), Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists (pass overwrite=True to replace it)")
    try:
        tar = tarfile.open(tar_path, mode="r:*", tarinfo=_BoundedTarInfo)  # noqa: SIM115 (with tar)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UnsafeArchiveError(f"{tar_path}: not a readable tar archive ({exc})") from exc
    with tar:
        members = _checked_members(tar, tar_path, max_member_bytes, max_total_bytes, max_members)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            files = _extract(tar, tar_path, members, tmp, max_member_bytes, max_total_bytes)
            _check_to_the_end(tar, tar_path)
            replace_dir(tmp, dest)  # never a half-written mix, never a moment without dest
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return [dest / f.relative_to(tmp) for f in files]


def _checked_members(
    tar: tarfile.TarFile, tar_path: Path, max_member: int, max_total: int, max_members: int
) -> list[tuple[tarfile.TarInfo, PurePosixPath]]:
    """Read and check every header before anything is written; each with its checked path."""
    members: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
    seen: set[PurePosixPath] = set()
    files: set[PurePosixPath] = set()  # no member may lie inside one of these
    folders: set[PurePosixPath] = set()  # where members lie: none of these may be a file
    total = 0
    try:
        while (member := tar.next()) is not None:
            if len(members) >= max_members:
                raise UnsafeArchiveError(f"{tar_path}: more than {max_members} members")
            rel = _checked_path(member, tar_path)
            _check_type(member, tar_path)
            if member.size > max_member:
                raise UnsafeArchiveError(
                    f"{tar_path}: member {member.name!r} declares {member.size} bytes "
                    f"(limit {max_member})"
                )
            total += member.size
            if total > max_total:
                raise UnsafeArchiveError(
                    f"{tar_path}: members declare more than {max_total} bytes in total"
                )
            if rel in seen:
                raise UnsafeArchiveError(f"{tar_path}: duplicate member {member.name!r}")
            if any(p in files for p in rel.parents) or (member.isfile() and rel in folders):
                raise UnsafeArchiveError(f"{tar_path}: {member.name!r} is a file and a folder")
            seen.add(rel)
            folders.update(rel.parents)
            if member.isfile():
                files.add(rel)
            members.append((member, rel))
    except _READ_ERRORS as exc:
        raise UnsafeArchiveError(f"{tar_path}: corrupt or truncated archive ({exc})") from exc
    return members


MAX_TRAILING_BYTES = 1024 * 1024  # tar pads its end to 10 KiB records; more is not an archive


def _check_to_the_end(tar: tarfile.TarFile, tar_path: Path) -> None:
    """Read what follows the last member to the end of the stream: a gzip stream's CRC and
    length are checked only there (a flipped byte in a member is otherwise extracted as is)."""
    left = 0
    try:
        while chunk := tar.fileobj.read(_CHUNK):
            left += len(chunk)
            if left > MAX_TRAILING_BYTES:
                raise UnsafeArchiveError(f"{tar_path}: more than 1 MiB after the archive's end")
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise UnsafeArchiveError(f"{tar_path}: corrupt compressed stream ({exc})") from exc


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's header reader, refusing what would cost memory or recursion before it is
    read: a pax or GNU long-name header over 64 KiB, more than 8 of them in a row, GNU sparse
    headers (whose extension blocks tarfile collects without end)."""

    def _proc_member(self, tar: tarfile.TarFile):  # type: ignore[override]
        if self.type in _EXTENDED:
            if self.size > MAX_EXTENDED_HEADER_BYTES:
                raise UnsafeArchiveError(
                    f"{tar.name}: extended header of {self.size} bytes (limit "
                    f"{MAX_EXTENDED_HEADER_BYTES})"
                )
            in_a_row = getattr(tar, "_af_extended_in_a_row", 0) + 1
            if in_a_row > MAX_EXTENDED_IN_A_ROW:
                raise UnsafeArchiveError(
                    f"{tar.name}: more than {MAX_EXTENDED_IN_A_ROW} extended headers in a row"
                )
            tar._af_extended_in_a_row = in_a_row  # type: ignore[attr-defined]
        else:
            tar._af_extended_in_a_row = 0  # type: ignore[attr-defined]
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeArchiveError(f"{tar.name}: sparse file {self.name!r}")
        return super()._proc_member(tar)


_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


def _checked_path(member: tarfile.TarInfo, tar_path: Path) -> PurePosixPath:
    name = member.name
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        raise UnsafeArchiveError(
            f"{tar_path}: member name {name[:60]!r}... is longer than {MAX_NAME_BYTES} bytes"
        )
    if len([p for p in name.split("/") if p not in ("", ".")]) > MAX_DEPTH:
        raise UnsafeArchiveError(
            f"{tar_path}: member {name[:60]!r}... is deeper than {MAX_DEPTH} path parts"
        )
    path = PurePosixPath(name)
    if long := [
        p for p in path.parts if len(p.encode("utf-8", "surrogateescape")) > MAX_PART_BYTES
    ]:
        raise UnsafeArchiveError(
            f"{tar_path}: member {name[:60]!r} has a part longer than {MAX_PART_BYTES} bytes "
            f"({long[0][:20]!r}...)"
        )
    if not name or name.startswith("/") or path.is_absolute():
        raise UnsafeArchiveError(f"{tar_path}: absolute path {name!r}")
    if ".." in path.parts:
        raise UnsafeArchiveError(f"{tar_path}: path traversal in {name!r}")
    parts = [p for p in path.parts if p != "."]
    if not parts and not member.isdir():
        raise UnsafeArchiveError(f"{tar_path}: empty member name")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _check_type(member: tarfile.TarInfo, tar_path: Path) -> None:
    name = member.name
    if member.issym():
        raise UnsafeArchiveError(f"{tar_path}: symlink {name!r} -> {member.linkname!r}")
    if member.islnk():
        raise UnsafeArchiveError(f"{tar_path}: hardlink {name!r} -> {member.linkname!r}")
    if member.ischr() or member.isblk():
        raise UnsafeArchiveError(f"{tar_path}: device file {name!r}")
    if member.isfifo():
        raise UnsafeArchiveError(f"{tar_path}: FIFO {name!r}")
    if member.issparse():
        raise UnsafeArchiveError(f"{tar_path}: sparse file {name!r}")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"{tar_path}: unsupported member type {member.type!r}: {name!r}")


def _extract(
    tar: tarfile.TarFile,
    tar_path: Path,
    members: list[tuple[tarfile.TarInfo, PurePosixPath]],
    root: Path,
    max_member: int,
    max_total: int,
) -> list[Path]:
    files: list[Path] = []
    total = 0
    for member, rel in members:
        target = root / rel
        if member.isdir():
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
            continue
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        source = tar.extractfile(member)
        if source is None:  # cannot happen for regular files; be explicit rather than crash
            raise UnsafeArchiveError(f"{tar_path}: no data for {member.name!r}")
        written = 0
        # O_EXCL: a name that already exists (e.g. through a case-folding filesystem) is refused.
        with source, open(target, "xb") as out:
            while chunk := _read(source, tar_path, member.name):
                written += len(chunk)
                total += len(chunk)
                if written > max_member or total > max_total:
                    raise UnsafeArchiveError(
                        f"{tar_path}: {member.name!r} expands past the size limits"
                    )
                out.write(chunk)
        target.chmod(0o755 if member.mode & 0o111 else 0o644)
        files.append(target)
    return files


def _read(source, tar_path: Path, name: str) -> bytes:
    """The next chunk of a member's data; a decompressor's error is the archive's fault."""
    try:
        return source.read(_CHUNK)
    except _READ_ERRORS as exc:
        raise UnsafeArchiveError(f"{tar_path}: corrupt data in {name!r} ({exc})") from exc


def write_reproducible_tar(
    src_dir: Path,
    out_path: Path,
    arcname: str,
    *,
    allow_symlinks: bool = False,
    compresslevel: int = 9,
) -> Path:
    """Write ``src_dir`` as ``out_path`` (tar.gz) with its contents under ``arcname/``.

    Reproducible: members sorted by path, mtime fixed, uid/gid 0 with empty owner names, modes
    0755 (folders, executables) or 0644, gzip header without mtime or file name. Symlinks are
    refused unless ``allow_symlinks`` (a venv's ``bin/python``; such an archive is not for
    :func:`safe_extract`, which refuses links); special files always are. ``arcname="."`` puts
    the contents at the top. Written to a temporary name and renamed, so a reader never sees
    half an archive.
    """
    src_dir, out_path = Path(src_dir), Path(out_path)
    if not src_dir.is_dir():
        raise NotADirectoryError(f"{src_dir} is not a folder")
    arc = PurePosixPath(arcname)
    if not arcname or arc.is_absolute() or ".." in arc.parts:
        raise ValueError(f"arcname must be a relative path without '..' (got {arcname!r})")
    entries = _sorted_entries(src_dir, allow_symlinks)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with (
            open(tmp, "wb") as raw,
            gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=compresslevel
            ) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            tar.addfile(_info(str(arc), src_dir.stat(), is_dir=True))  # arcname "." too
            for rel, st in entries:
                info = _info(str(arc / rel), st, is_dir=stat.S_ISDIR(st.st_mode))
                if stat.S_ISLNK(st.st_mode):
                    info.type, info.size, info.mode = tarfile.SYMTYPE, 0, 0o777
                    info.linkname = os.readlink(src_dir / rel)
                    tar.addfile(info)
                elif info.isdir():
                    tar.addfile(info)
                else:
                    with open(src_dir / rel, "rb") as data:
                        tar.addfile(info, data)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _sorted_entries(src_dir: Path, allow_symlinks: bool) -> list[tuple[str, os.stat_result]]:
    entries = []
    for folder, dirs, files in os.walk(src_dir):  # does not follow symlinked folders
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            ok = stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)
            if not ok and not (allow_symlinks and stat.S_ISLNK(st.st_mode)):
                raise ValueError(f"{path}: only regular files and folders can be archived")
            entries.append((path.relative_to(src_dir).as_posix(), st))
    return sorted(entries, key=lambda e: e[0])


def _info(name: str, st: os.stat_result, *, is_dir: bool) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.size = 0 if is_dir else st.st_size
    info.mode = 0o755 if is_dir or st.st_mode & 0o100 else 0o644
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
