"""Adapters in host memory, ready to copy into a LoRA slot; the cache is bounded in bytes.

:func:`read_slot_adapter` reads one adapter folder (the one format of :mod:`avatarforge.adapter`:
metadata and sha256 checked, base hash compared) into a :class:`SlotAdapter`: its tensors packed
into one host buffer (page-locked when the slots live on a GPU, so the copy to the device is a
plain DMA), named by the layers they adapt, as diffusers' loaders name them. An adapter the
slots cannot reproduce exactly (other layers than the slots', DoRA, rsLoRA, per-layer ranks, a
LoRA bias, no config in the file) is a :class:`NotSlottable` with the reason: the caller serves
it through diffusers' ``load_lora_weights`` instead.

:class:`HostAdapterCache` keeps them, least recently used out first, within a byte budget. It is
keyed by folder *and* the identity of the weights file (:func:`files_signature`): SageMaker MME
unpacks an updated ``<user>.tar.gz`` to the folder of the old one, and that must be read again.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapter import WEIGHTS_FILE, AdapterError, read_adapter
from ..base.identity import BaseInfo, check_same_base
from ..errors import AvatarforgeError
from .lora_slots import GROUPS, UNET, LoraWeights

log = logging.getLogger(__name__)

LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header

# LoraConfig fields that change the forward pass, with the value a plain LoRA has: the slots
# compute plain LoRA (B A x * alpha / r), so anything else goes through peft itself.
_PLAIN = {
    "use_dora": False,
    "use_rslora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "bias": "none",
    "lora_bias": False,
    "fan_in_fan_out": False,
    "layer_replication": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "megatron_config": None,
    "trainable_token_indices": None,
    "modules_to_save": None,
}


def files_signature(adapter_dir: str | Path) -> tuple[int, ...] | None:
    """Identity of the weights file now in the folder (one stat; ctime changes on re-extract)."""
    try:
        st = (Path(adapter_dir) / WEIGHTS_FILE).stat()
    except OSError:
        return None  # the loader reports a missing adapter; nothing to compare here
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class SlotAdapter(LoraWeights):
    """An adapter ready for the slots; its tensors are views of one host buffer."""

    folder: str = ""
    signature: tuple[int, ...] | None = None
    buffer: Any = None


@dataclass(frozen=True)
class NotSlottable:
    """An adapter the slots cannot reproduce exactly, and why (it is served the old way)."""

    folder: str
    signature: tuple[int, ...] | None
    reason: str
    nbytes: int = 0


@dataclass
class SlotFit:
    """What the slots cover: (group, layer) -> (in, out), and every module name per group (to
    find which layers a LoRA config targets, as peft would)."""

    shapes: dict[tuple[str, str], tuple[int, int]]
    module_names: dict[str, tuple[str, ...]]
    _targeted: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)

    def targeted(self, group: str, config: dict[str, Any]) -> frozenset[str]:
        """The modules of ``group`` peft would adapt under ``config`` (memoised per config)."""
        key = (group, json.dumps([config.get("target_modules"), config.get("exclude_modules")]))
        if key not in self._targeted:
            from peft import LoraConfig
            from peft.tuners.tuners_utils import check_target_module_exists

            lora = LoraConfig(
                r=int(config["r"]),
                target_modules=config.get("target_modules"),
                exclude_modules=config.get("exclude_modules"),
            )
            names = self.module_names.get(group, ())
            self._targeted[key] = frozenset(
                n for n in names if n and check_target_module_exists(lora, n)
            )
        return self._targeted[key]


def _peft_layers(state: dict[str, Any], group: str, module_names: tuple[str, ...]) -> dict:
    """diffusers-format LoRA keys of one model -> {layer name: (A, B)}, converted as diffusers'
    loaders convert them (so both paths adapt the same layers)."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if group == UNET:
        if "lora_A" not in next(iter(state)):
            state = convert_unet_state_dict_to_peft(state)
    else:
        state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
        if not any(n.startswith("text_model.") for n in module_names):
            # CLIPTextModel is flat in transformers 5; older files name "text_model." first
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
    layers: dict[str, list[Any]] = {}
    for key, value in state.items():
        for part, index in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if key.endswith(part):
                layers.setdefault(key.removesuffix(part), [None, None])[index] = value
                break
        else:
            raise _Unfit(f"{group}: tensor {key!r} is not a LoRA A or B weight")
    for name, (a, b) in layers.items():
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise _Unfit(f"{group}.{name}: not a pair of LoRA matrices")
    return {name: (a, b) for name, (a, b) in layers.items()}


class _Unfit(AvatarforgeError):
    """Why an adapter does not fit the slots (internal: becomes a NotSlottable)."""


def _group_configs(header: dict[str, str]) -> dict[str, dict[str, Any]]:
    raw = header.get(LORA_METADATA_KEY)
    if not raw:
        return {}
    flat = json.loads(raw)
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        group, _, name = key.partition(".")
        out.setdefault(group, {})[name] = value
    return out


def _fit(group: str, config: dict[str, Any] | None, layers: dict, fit: SlotFit) -> float:
    """Check one model's LoRA fits the slots exactly; returns its scale (alpha / r)."""
    if not config:
        raise _Unfit(f"{group}: no LoRA config in the weights file's header")
    for key, plain in _PLAIN.items():
        value = config.get(key, plain)
        if value != plain and (value or plain):
            raise _Unfit(f"{group}: {key}={value!r} (the slots compute plain LoRA)")
    r = int(config["r"])
    for name, (a, b) in layers.items():
        if (group, name) not in fit.shapes:
            raise _Unfit(f"{group}.{name}: a layer without a slot")
        if a.shape[0] != r:
            raise _Unfit(f"{group}.{name}: rank {a.shape[0]}, the config says {r}")
        if (a.shape[1], b.shape[0]) != fit.shapes[group, name]:
            raise _Unfit(f"{group}.{name}: shapes do not match the layer")
    targeted = fit.targeted(group, config)
    if set(layers) != targeted:
        missing, extra = sorted(targeted - set(layers)), sorted(set(layers) - targeted)
        raise _Unfit(f"{group}: targeted layers without weights {missing[:2]}, or weights "
                     f"for untargeted layers {extra[:2]}")  # fmt: skip
    return config["lora_alpha"] / r  # peft: scaling = lora_alpha / r


def read_slot_adapter(
    folder: str | Path, base: BaseInfo, fit: SlotFit, *, pin: bool = False
) -> SlotAdapter | NotSlottable:
    """Read an adapter folder for the slots; raises AdapterError / BaseError for a broken one or
    one trained on another base (the request fails with that message)."""
    from safetensors import safe_open

    folder = str(folder)
    signature = files_signature(folder)
    meta = read_adapter(Path(folder))  # checks the metadata and the weights' sha256
    check_same_base(meta.to_dict(), base)
    path = Path(folder) / WEIGHTS_FILE
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        configs = _group_configs(header)
        by_group = {
            g: {k.removeprefix(f"{g}."): v for k, v in state.items() if k.startswith(f"{g}.")}
            for g in GROUPS
        }
        if other := sorted(k for k in state if not k.startswith(tuple(f"{g}." for g in GROUPS))):
            raise _Unfit(f"tensors of other models: {other[:2]}")
        weights: dict[tuple[str, str], tuple[Any, Any]] = {}
        scales: dict[str, float] = {}
        for group, part in by_group.items():
            if not part:
                continue
            layers = _peft_layers(part, group, fit.module_names.get(group, ()))
            scales[group] = _fit(group, configs.get(group), layers, fit)
            weights.update({(group, name): ab for name, ab in layers.items()})
        if UNET not in scales:
            raise _Unfit("no UNet LoRA")
    except (_Unfit, KeyError, TypeError, ValueError) as exc:
        reason = str(exc) if isinstance(exc, _Unfit) else f"{type(exc).__name__}: {exc}"
        return NotSlottable(folder, signature, reason)
    return _pack(folder, signature, weights, scales, pin, meta)


def _pack(folder, signature, weights, scales, pin: bool, meta) -> SlotAdapter:
    """One host buffer for all tensors (one page-locked allocation instead of hundreds)."""
    import torch

    dtypes = {t.dtype for pair in weights.values() for t in pair}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    total = sum(t.numel() for pair in weights.values() for t in pair)
    buffer = torch.empty(total, dtype=dtype, pin_memory=pin)
    packed, offset = {}, 0
    for key in sorted(weights):
        views = []
        for t in weights[key]:
            view = buffer[offset : offset + t.numel()].view(t.shape)
            view.copy_(t)
            views.append(view)
            offset += t.numel()
        packed[key] = (views[0], views[1])
    return SlotAdapter(
        weights=packed,
        scales=scales,
        nbytes=_host_bytes(buffer.nbytes, pin),
        extra={"base_hash": meta.base_hash, "token": meta.token},
        folder=folder,
        signature=signature,
        buffer=buffer,
    )


def _host_bytes(nbytes: int, pinned: bool) -> int:
    """What a buffer really holds: torch's pinned-memory allocator rounds each block up to a
    power of two (a 6.1 MiB default-rank SD 2.1 adapter takes 8 MiB pinned)."""
    return 1 << max(nbytes - 1, 0).bit_length() if pinned else nbytes


class HostAdapterCache:
    """Adapters read for the slots, least recently used out first, within ``limit_bytes``.

    A folder whose weights file changed (another inode, size, mtime or ctime) is read again;
    :class:`NotSlottable` answers are remembered too (they cost no buffer). ``limit_bytes`` 0
    keeps nothing: every activation that misses the slots reads the folder.
    """

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 0:
            raise ValueError(f"host adapter cache: limit must be >= 0 bytes (got {limit_bytes})")
        self.limit_bytes = limit_bytes
        self._entries: OrderedDict[str, SlotAdapter | NotSlottable] = OrderedDict()
        self.nbytes = 0
        self.reads = 0  # folders read from disk (cache misses)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, folder: str) -> bool:
        return folder in self._entries

    def get(
        self,
        folder: str,
        signature: tuple[int, ...] | None,
        read: Callable[[], SlotAdapter | NotSlottable],
    ) -> SlotAdapter | NotSlottable:
        entry = self._entries.get(folder)
        if entry is not None and entry.signature == signature:
            self._entries.move_to_end(folder)
            return entry
        if entry is not None:
            log.info("adapter %s changed on disk; reading it again", folder)
            self._remove(folder)
        entry = read()
        self.reads += 1
        if entry.nbytes <= self.limit_bytes:
            self._entries[folder] = entry
            self.nbytes += entry.nbytes
            while self.nbytes > self.limit_bytes:
                self._remove(next(iter(self._entries)))
        return entry

    def _remove(self, folder: str) -> None:
        self.nbytes -= self._entries.pop(folder).nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
