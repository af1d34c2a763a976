"""safe_extract against real hostile archives built here; write_reproducible_tar's bytes."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from avatarforge.safe_tar import UnsafeArchiveError, safe_extract, write_reproducible_tar


def _make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def _assert_refused(tmp_path: Path, archive: Path, match: str, **limits: int) -> None:
    dest = tmp_path / "out" / "model"
    with pytest.raises(UnsafeArchiveError, match=match):
        safe_extract(archive, dest, **limits)
    assert not dest.exists()
    # nothing left beside dest either: no partial temp folder
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "evil").exists() and not (tmp_path / "etc").exists()


def test_extracts_a_plain_model_archive(tmp_path: Path) -> None:
    archive = _make_tar(
        tmp_path / "ok.tar.gz",
        [
            _special("alice", tarfile.DIRTYPE),
            _file("alice/config.pbtxt", b'backend: "python"\n'),
            _file("alice/1/model.py", b"print('hi')\n", mode=0o755),
            _file("./alice/1/weights.bin", bytes(1000)),
        ],
    )
    files = safe_extract(archive, tmp_path / "dest" / "model")
    root = tmp_path / "dest" / "model"
    assert [f.relative_to(root).as_posix() for f in files] == [
        "alice/config.pbtxt",
        "alice/1/model.py",
        "alice/1/weights.bin",
    ]
    assert (root / "alice/config.pbtxt").read_bytes() == b'backend: "python"\n'
    assert (root / "alice/1/model.py").stat().st_mode & 0o777 == 0o755
    assert (root / "alice/config.pbtxt").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["model"]


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([_file("../evil", b"boom")], "path traversal"),
        ([_file("alice/../../evil", b"boom")], "path traversal"),
        ([_file("/etc/evil", b"boom")], "absolute path"),
        ([_file("ok.txt"), _special("alice/link", tarfile.SYMTYPE, "/etc/passwd")], "symlink"),
        ([_file("ok.txt"), _special("alice/hard", tarfile.LNKTYPE, "ok.txt")], "hardlink"),
        ([_special("dev/sda", tarfile.BLKTYPE)], "device file"),
        ([_special("dev/tty", tarfile.CHRTYPE)], "device file"),
        ([_special("pipe", tarfile.FIFOTYPE)], "FIFO"),
        ([_file("a.txt"), _file("a.txt")], "duplicate member"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "symlink",
        "hardlink",
        "block-device",
        "char-device",
        "fifo",
        "duplicate",
    ],
)
def test_refuses_hostile_members(tmp_path: Path, members: list, match: str) -> None:
    # the harmless members come first: proves the check runs before anything is written
    archive = _make_tar(tmp_path / "evil.tar.gz", [_file("first.txt"), *members])
    _assert_refused(tmp_path, archive, match)


def test_refuses_huge_declared_size_without_reading_it(tmp_path: Path) -> None:
    # A header that claims 1 TiB followed by no data: refused on the header alone.
    info = tarfile.TarInfo("alice/weights.bin")
    info.size = 1024**4
    raw = io.BytesIO()
    raw.write(info.tobuf(format=tarfile.PAX_FORMAT))
    archive = tmp_path / "huge.tar.gz"
    archive.write_bytes(gzip.compress(raw.getvalue()))
    _assert_refused(tmp_path, archive, r"declares 1099511627776 bytes")


def test_refuses_gzip_bomb_by_total_size(tmp_path: Path) -> None:
    # 8 x 4 MiB of zeros compress to a few KiB; each member is under the per-member limit.
    zeros = bytes(4 * 1024**2)
    archive = _make_tar(tmp_path / "bomb.tar.gz", [_file(f"z{i}", zeros) for i in range(8)])
    assert archive.stat().st_size < 200_000
    _assert_refused(
        tmp_path,
        archive,
        "more than 16777216 bytes in total",
        max_member_bytes=8 * 1024**2,
        max_total_bytes=16 * 1024**2,
    )


def test_refuses_oversized_member(tmp_path: Path) -> None:
    archive = _make_tar(tmp_path / "big.tar.gz", [_file("big.bin", bytes(2048))])
    _assert_refused(tmp_path, archive, "declares 2048 bytes", max_member_bytes=1024)


def test_refuses_too_many_members(tmp_path: Path) -> None:
    archive = _make_tar(tmp_path / "many.tar.gz", [_file(f"f{i}") for i in range(11)])
    _assert_refused(tmp_path, archive, "more than 10 members", max_members=10)


def test_refuses_garbage_and_truncated_archives(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"this is not a tarball" * 10)
    _assert_refused(tmp_path, garbage, "not a readable tar archive")
    good = _make_tar(tmp_path / "good.tar.gz", [_file("a.bin", os.urandom(100_000))])
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[:5000])
    _assert_refused(tmp_path, truncated, "corrupt|truncated|not a readable")


def test_dest_exists_needs_overwrite_and_is_replaced_whole(tmp_path: Path) -> None:
    archive = _make_tar(tmp_path / "ok.tar.gz", [_file("alice/new.txt", b"new")])
    dest = tmp_path / "model"
    (dest / "alice").mkdir(parents=True)
    (dest / "alice" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        safe_extract(archive, dest)
    safe_extract(archive, dest, overwrite=True)
    assert sorted(p.name for p in (dest / "alice").iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _tree(root: Path) -> None:
    (root / "1").mkdir(parents=True)
    (root / "config.pbtxt").write_text('name: "alice"\n')
    (root / "1" / "model.py").write_text("pass\n")
    (root / "1" / "run.sh").write_text("#!/bin/sh\n")
    (root / "1" / "run.sh").chmod(0o775)
    (root / "1" / "weights.safetensors").write_bytes(os.urandom(4096))


def test_reproducible_tar_same_bytes_for_same_input(tmp_path: Path) -> None:
    src = tmp_path / "alice"
    _tree(src)
    first = write_reproducible_tar(src, tmp_path / "a" / "alice.tar.gz", "alice")
    # touch everything, change permissions noise and wait: bytes must not change
    time.sleep(1.1)
    for path in src.rglob("*"):
        os.utime(path)
    (src / "config.pbtxt").chmod(0o600)
    second = write_reproducible_tar(src, tmp_path / "b" / "alice.tar.gz", "alice")
    assert first.read_bytes() == second.read_bytes()

    raw = first.read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # gzip MTIME field
    assert raw[3] & 0x08 == 0  # FNAME flag: no file name stored
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == [
        "alice",
        "alice/1",
        "alice/1/model.py",
        "alice/1/run.sh",
        "alice/1/weights.safetensors",
        "alice/config.pbtxt",
    ]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    modes = {m.name: m.mode for m in members}
    assert modes["alice/1/run.sh"] == 0o755 and modes["alice/config.pbtxt"] == 0o644

    # and what we write, we can read back safely
    files = safe_extract(first, tmp_path / "x")
    assert (tmp_path / "x/alice/1/weights.safetensors").read_bytes() == (
        src / "1/weights.safetensors"
    ).read_bytes()
    assert len(files) == 4


def test_reproducible_tar_refuses_links_and_bad_arcname(tmp_path: Path) -> None:
    src = tmp_path / "alice"
    _tree(src)
    with pytest.raises(ValueError, match="arcname"):
        write_reproducible_tar(src, tmp_path / "x.tar.gz", "../alice")
    (src / "link").symlink_to("/etc/passwd")
    with pytest.raises(ValueError, match="only regular files"):
        write_reproducible_tar(src, tmp_path / "x.tar.gz", "alice")
    assert not (tmp_path / "x.tar.gz").exists()


# ------------------------------------------------------- headers that cost memory or recursion


def _deep(depth: int, tmp_path: Path) -> Path:
    # one member, its name `depth` folders deep: a few hundred bytes compressed
    return _make_tar(tmp_path / "deep.tar.gz", [_file("/".join(["a"] * depth) + "/f")])


@pytest.mark.parametrize("depth", [33, 2_000, 32_000])
def test_a_deep_member_name_is_refused_before_any_work(tmp_path: Path, depth: int) -> None:
    # was: depth 2,000 a RecursionError, 4,000 an OSError, 32,000 3.9 GB and a MemoryError
    archive = _deep(depth, tmp_path)
    assert archive.stat().st_size < 2_000
    started = time.perf_counter()
    _assert_refused(tmp_path, archive, r"deeper than 32 path parts|longer than 1024 bytes")
    assert time.perf_counter() - started < 2


def test_the_deepest_and_longest_names_allowed_extract(tmp_path: Path) -> None:
    deep = "/".join(["d"] * 31) + "/f"  # 32 parts: the limit
    long = "x" * 255 + "/" + "y" * 255 + "/" + "z" * 255  # parts at NAME_MAX, 767 bytes
    archive = _make_tar(tmp_path / "ok.tar.gz", [_file(deep), _file(long)])
    files = safe_extract(archive, tmp_path / "dest")
    assert len(files) == 2 and all(f.read_bytes() == b"x" for f in files)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("a" * 1025, "longer than 1024 bytes"),
        ("é" * 513, "longer than 1024 bytes"),  # bytes, not characters
        ("a/" + "b" * 256, "part longer than 255 bytes"),  # was an OSError (ENAMETOOLONG)
    ],
)
def test_long_names_are_refused(tmp_path: Path, name: str, match: str) -> None:
    _assert_refused(tmp_path, _make_tar(tmp_path / "long.tar.gz", [_file(name)]), match)


def _raw_tar(tmp_path: Path, headers: bytes) -> Path:
    """``headers`` then one empty member named 'x' and the end blocks, gzipped."""
    end = tarfile.TarInfo("x").tobuf(format=tarfile.USTAR_FORMAT) + bytes(1024)
    archive = tmp_path / "raw.tar.gz"
    archive.write_bytes(gzip.compress(headers + end))
    return archive


def _extended(kind: bytes, payload: bytes) -> bytes:
    info = tarfile.TarInfo("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "pax")
    info.type, info.size = kind, len(payload)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512)


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n"
    length = len(body) + len(str(len(body)))
    length += len(str(length)) - len(str(len(body)))
    return f"{length}{body}".encode()


def test_a_huge_extended_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    # 64 MiB of name in a pax header: ~65 KB gzipped; tarfile alone reads it whole (RSS +500 MB)
    pax = _extended(tarfile.XHDTYPE, _pax_record("path", "a" * 64 * 2**20))
    archive = _raw_tar(tmp_path, pax)
    assert archive.stat().st_size < 100_000
    _assert_refused(tmp_path, archive, r"extended header of 67108\d\d\d bytes")
    longname = _extended(tarfile.GNUTYPE_LONGNAME, b"a" * 2**20 + b"\0")
    _assert_refused(tmp_path, _raw_tar(tmp_path, longname), r"extended header of 1048577 bytes")


def test_a_chain_of_extended_headers_is_refused_not_a_recursion_error(tmp_path: Path) -> None:
    pax = _extended(tarfile.XHDTYPE, _pax_record("path", "ab"))
    _assert_refused(tmp_path, _raw_tar(tmp_path, pax * 3000), "extended headers in a row")
    # a few in a row are what tar writes (a global header, then a member's own): accepted
    files = safe_extract(_raw_tar(tmp_path, pax * 2), tmp_path / "dest")
    assert [f.name for f in files] == ["ab"]
