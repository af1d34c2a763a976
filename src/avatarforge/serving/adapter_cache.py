"""An LRU of user adapters loaded on the one shared pipeline, switched per request.

Loading a LoRA costs ~100 ms on the tiny base (more at SD 2.1 size); switching between loaded
ones is a flag. The least recently used adapter is unloaded when ``capacity`` is reached, and a
failed load leaves nothing half-loaded behind.

Adapters are named by folder, and a folder can be replaced under the same path: SageMaker MME
unpacks a TargetModel to ``<root>/<hash of its name>/model``, so a user whose ``<user>.tar.gz``
was updated comes back, after an unload, at the path of the old adapter. A folder whose weights
file is not the one that was loaded (another inode, size, mtime or ctime) is loaded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from ..base import BaseInfo

log = logging.getLogger(__name__)


def _files_signature(adapter_dir: str | Path) -> tuple[int, ...] | None:
    """Identity of the weights file now in the folder (one stat; ctime changes on re-extract)."""
    from ..adapter import WEIGHTS_FILE

    try:
        st = (Path(adapter_dir) / WEIGHTS_FILE).stat()
    except OSError:
        return None  # the loader reports a missing adapter; nothing to compare here
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def adapter_name(adapter_dir: str | Path) -> str:
    """A stable, peft-safe name per adapter folder (folder names may hold any character)."""
    return "u" + hashlib.sha256(str(Path(adapter_dir).resolve()).encode()).hexdigest()[:16]


class AdapterCache:
    def __init__(
        self,
        pipe,
        base: BaseInfo,
        capacity: int = 16,
        *,
        load: Callable | None = None,
        unload: Callable | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"adapter cache capacity must be >= 1 (got {capacity})")
        if load is None or unload is None:
            from ..adapter import load_adapter, unload_adapter

            load, unload = load or load_adapter, unload or unload_adapter
        self.pipe, self.base, self.capacity = pipe, base, capacity
        self._load, self._unload = load, unload
        # name -> (folder, its weights file when loaded), oldest use first
        self._loaded: OrderedDict[str, tuple[str, tuple[int, ...] | None]] = OrderedDict()
        self._lora_enabled = True

    @property
    def loaded(self) -> list[str]:
        return [folder for folder, _ in self._loaded.values()]

    def activate(self, adapter_dir: str | None) -> None:
        """Make ``adapter_dir`` the only active adapter (None: the bare base)."""
        if adapter_dir is None:
            if self._loaded and self._lora_enabled:
                self.pipe.disable_lora()
                self._lora_enabled = False
            return
        name = adapter_name(adapter_dir)
        signature = _files_signature(adapter_dir)
        if name in self._loaded and self._loaded[name][1] != signature:
            log.info("adapter %s changed on disk; loading it again", adapter_dir)
            self._drop(name)
        if name in self._loaded:
            self._loaded.move_to_end(name)
        else:
            while len(self._loaded) >= self.capacity:
                old, (folder, _) = next(iter(self._loaded.items()))
                log.info("evicting adapter %s", folder)
                self._drop(old)
            self._load_one(adapter_dir, name, signature)
        if not self._lora_enabled:
            self.pipe.enable_lora()
            self._lora_enabled = True
        self.pipe.set_adapters([name])

    def _load_one(self, adapter_dir: str, name: str, signature: tuple[int, ...] | None) -> None:
        try:
            self._load(self.pipe, Path(adapter_dir), self.base, name)
        except Exception:
            # A load that failed halfway may have added LoRA layers under this name.
            with contextlib.suppress(Exception):  # usually nothing was loaded
                self._unload(self.pipe, name)
            raise
        self._loaded[name] = (str(adapter_dir), signature)

    def _drop(self, name: str) -> None:
        del self._loaded[name]
        self._unload(self.pipe, name)

    def clear(self) -> None:
        while self._loaded:
            self._drop(next(iter(self._loaded)))
