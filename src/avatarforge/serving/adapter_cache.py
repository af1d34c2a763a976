"""The user adapters of the one shared pipeline, switched per request.

:class:`SlotAdapterCache` (what the shared base uses): an adapter is activated by copying its
tensors into one of a few LoRA slots injected once (:mod:`.lora_slots`), from a host-memory cache
bounded in bytes (:mod:`.host_adapters`); the GPU holds the slots and nothing per user. Adapters
the slots cannot reproduce exactly go to an :class:`AdapterCache`.

:class:`AdapterCache` (diffusers' way): an LRU of adapters loaded into the pipeline with
``load_lora_weights``; switching between loaded ones is ``set_adapters``, the least recently
used one is unloaded when ``capacity`` is reached, and a failed load leaves nothing half-loaded.

Adapters are named by folder, and a folder can be replaced under the same path: SageMaker MME
unpacks a TargetModel to ``<root>/<hash of its name>/model``, so a user whose ``<user>.tar.gz``
was updated comes back, after an unload, at the path of the old adapter. A folder whose weights
file is not the one that was loaded (another inode, size, mtime or ctime) is loaded again, by
both caches.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..base.identity import BaseInfo
from .host_adapters import (
    HostAdapterCache,
    NotSlottable,
    SlotAdapter,
    SlotFit,
    files_signature,
    read_slot_adapter,
)

log = logging.getLogger(__name__)

_files_signature = files_signature  # its name before it moved to host_adapters


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


class SlotAdapterCache:
    """Adapters activated by a copy into preallocated LoRA slots; see the module's docstring.

    ``slots``: adapters resident at once (at least the distinct adapters of one batched call);
    switching among them costs nothing. ``host_cache_bytes``: the host-memory cache (page-locked
    on a GPU); an adapter in it is a copy away, one not in it is read from its folder first.
    ``fallback_capacity``: adapters the slots cannot reproduce, loaded with load_lora_weights.
    """

    def __init__(
        self,
        pipe,
        base: BaseInfo,
        *,
        slots: int = 8,
        host_cache_bytes: int = 0,
        fallback_capacity: int = 16,
        rank: int = 8,
    ) -> None:
        from .lora_slots import LoraSlots

        self.pipe, self.base = pipe, base
        self.slots = LoraSlots(pipe, count=slots, rank=rank)
        self.fit = SlotFit(self.slots.shapes(), self.slots.module_names)
        self.host = HostAdapterCache(host_cache_bytes)
        self.fallback = AdapterCache(pipe, base, fallback_capacity)
        self.pin = pipe.unet.device.type == "cuda"  # page-locked host copies for the DMA

    def _key(self, adapter_dir: str) -> tuple[str, tuple[int, ...] | None]:
        return (adapter_dir, files_signature(adapter_dir))

    def _read(self, key) -> SlotAdapter | NotSlottable:
        folder, signature = key
        reads = self.host.reads
        entry = self.host.get(
            folder, signature, lambda: read_slot_adapter(folder, self.base, self.fit, pin=self.pin)
        )
        if self.host.reads != reads:  # read from the folder just now
            for old in self.slots.resident():  # an older copy of a replaced folder
                if old is not None and old[0] == folder and old != key:
                    self.slots.drop(old)
            if isinstance(entry, NotSlottable):
                log.info("adapter %s does not fit the LoRA slots (%s)", folder, entry.reason)
        return entry

    def _slot(self, key, keep: Sequence[int] = ()) -> int | None:
        """The slot holding ``key`` (read and copied in if needed); None: not slottable."""
        slot = self.slots.slot_of(key)
        if slot is not None:
            self.slots.touch(slot)
            return slot
        entry = self._read(key)
        if isinstance(entry, NotSlottable):
            return None
        return self.slots.load(key, entry, keep)

    def batchable(self, adapter_dir: str | None) -> bool:
        """Whether the adapter's rows can share a pipeline call (it fits the slots); reads it,
        so a broken adapter raises here (AdapterError, BaseError)."""
        if adapter_dir is None:
            return True
        key = self._key(str(adapter_dir))
        return self.slots.slot_of(key) is not None or isinstance(self._read(key), SlotAdapter)

    def activate(self, adapter_dir: str | None) -> None:
        """Make ``adapter_dir`` the only active adapter (None: the bare base)."""
        if adapter_dir is None:
            self.slots.off()
            self.fallback.activate(None)
            return
        key = self._key(str(adapter_dir))
        slot = self._slot(key)
        if slot is None:
            self.slots.off()
            self.fallback.activate(str(adapter_dir))
            return
        self.fallback.activate(None)  # LoRA layers of a fallback adapter add nothing now
        self.slots.use(slot)

    @contextlib.contextmanager
    def rows(self, adapter_dirs: Sequence[str | None], num_images: int) -> Iterator[None]:
        """Within the block, prompt ``i`` of a pipeline call uses ``adapter_dirs[i]``."""
        from .lora_slots import SlotError

        folders = list(dict.fromkeys(str(d) for d in adapter_dirs if d is not None))
        for _ in range(2):  # twice if a larger rank grew (and so emptied) the slots midway
            slot_of: dict[str, int] = {}
            for folder in folders:
                slot = self._slot(self._key(folder), keep=list(slot_of.values()))
                if slot is None:
                    raise SlotError(f"adapter {folder} does not fit the LoRA slots: it runs alone")
                slot_of[folder] = slot
            resident = self.slots.resident()
            if all(resident[slot] is not None for slot in slot_of.values()):
                break
        self.fallback.activate(None)
        rows = [None if d is None else slot_of[str(d)] for d in adapter_dirs]
        with self.slots.rows(rows, num_images):
            yield

    def memory(self) -> dict[str, int]:
        """Bytes held: the slots on their device (fixed), the host cache (grows to its limit)."""
        return {
            "slot_bytes": self.slots.nbytes,
            "host_cache_bytes": self.host.nbytes,
            "host_cache_adapters": len(self.host),
        }

    def clear(self) -> None:
        """Back to the bare pipeline: hooks removed, fallback adapters unloaded, cache empty."""
        self.slots.close()
        self.fallback.clear()
        self.host.clear()
