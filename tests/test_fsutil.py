"""A folder replaced while others read it is never missing (an adapter, a base, a checkpoint)."""

from __future__ import annotations

import threading
from pathlib import Path

from avatarforge.fsutil import _exchange, replace_dir


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "weights").write_text(text)
    (path / "meta").write_text(text)
    return path


def test_replacing_a_folder_under_readers_never_leaves_it_missing_or_mixed(tmp_path):
    dest = _folder(tmp_path / "adapter", "v0")
    seen: list[str | None] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append((dest / "weights").read_text())
            except FileNotFoundError:
                seen.append(None)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, 200):
            replace_dir(_folder(tmp_path / f".new-{version}", f"v{version}"), dest)
    finally:
        stop.set()
        thread.join()
    assert (dest / "weights").read_text() == "v199"
    assert None not in seen, "a reader found no folder"
    assert len(set(seen)) > 10  # it really read while the versions changed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing left behind


def test_a_new_destination_is_a_plain_rename(tmp_path):
    dest = replace_dir(_folder(tmp_path / ".new", "v1"), tmp_path / "base")
    assert (dest / "weights").read_text() == "v1" and not (tmp_path / ".new").exists()


def test_this_linux_swaps_in_one_step(tmp_path):
    a, b = _folder(tmp_path / "a", "A"), _folder(tmp_path / "b", "B")
    assert _exchange(a, b)  # renameat2(RENAME_EXCHANGE) works here: no fallback in tests
    assert (a / "weights").read_text() == "B" and (b / "weights").read_text() == "A"
