"""Preallocated LoRA slots on the shared pipeline: activating an adapter is a copy, not surgery.

Every layer that training adapts (:data:`avatarforge.train.lora.UNET_TARGETS` in the UNet,
:data:`~avatarforge.train.lora.TEXT_ENCODER_TARGETS` in the text encoder) gets, once, a forward
hook and ``count`` slots of LoRA weights: ``A`` [count, R, in] and ``B`` [count, out, R] on the
layer's device, in its dtype. Putting a user's adapter in a slot copies its tensors in place and
records its scale (alpha / rank); no module is injected or removed, so the GPU holds the same
memory for 1 or 10,000 users. The layers keep their identity: diffusers' own
``load_lora_weights`` can still wrap them for adapters the slots do not fit (see
:mod:`.adapter_cache`), and the hook then adds nothing.

Two ways to run (a *plan*, set before the pipeline is called):

- one slot (:meth:`LoraSlots.use`): the hook adds ``F.linear(F.linear(x, A), B) * scale`` to
  the layer's output with ``A``, ``B`` exactly as peft holds them (contiguous ``[r, in]`` and
  ``[out, r]``, an adapter of a smaller rank than the slot reads only its own rows), which is
  peft's own arithmetic in the same order: the same pixels as ``load_lora_weights``.
- one slot per row (:meth:`LoraSlots.rows`): a batch of prompts from different users in one
  pipeline call. Each row's ``A``/``B`` are gathered from the slots and applied with ``bmm``;
  a smaller rank reads zeros beyond its own (zero products: the same sum, in another order).
  Results equal separate runs within float rounding (the batch changes summation order).

A UNet compiled with ``torch.compile`` (:func:`avatarforge.base.pipeline.compile_unet`) gets a
*static* plan instead of a single slot: the slot number and the scales live in small device
tensors that :meth:`LoraSlots.use` and :meth:`LoraSlots.off` overwrite in place, and the hook
reads the whole slot (``A[slot]``, ``B[slot]``; ranks below the slot's read zeros). Every user
then runs the one traced graph: switching users changes tensor values, never a Python value
the graph was specialised on, so there is no recompile and no graph break (a CUDA graph replays
with the new values: the tensors keep their addresses). With an adapter of the slot's full
rank the arithmetic is the single-slot path's; a smaller rank adds exact zeros in another
order (float rounding). A batched call (:meth:`LoraSlots.rows`) runs the UNet eagerly: its
shape changes with each batch, and at several rows the GPU, not the launch overhead that
compiling saves, bounds it. The compile fuses the attention's q, k, v projections (diffusers'
``fuse_qkv_projections``); the parts' deltas are then added side by side on the fused layer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import AvatarforgeError

log = logging.getLogger(__name__)

UNET, TEXT_ENCODER = "unet", "text_encoder"
GROUPS = (UNET, TEXT_ENCODER)


class SlotError(AvatarforgeError, RuntimeError):
    """A plan or an adapter does not fit the slots (a bug, never a user's input)."""


@dataclass
class LoraWeights:
    """An adapter as the slots take it: per (group, layer name) the LoRA ``A`` [r, in] and ``B``
    [out, r] (any dtype and device: they are copied and cast), and per group its scale."""

    weights: dict[tuple[str, str], tuple[Any, Any]]
    scales: dict[str, float]  # group -> lora_alpha / r; a group absent: no LoRA there
    nbytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def rank(self, group: str) -> int:
        return max((a.shape[0] for (g, _), (a, _) in self.weights.items() if g == group), default=0)


def is_target(name: str, targets: Sequence[str]) -> bool:
    """peft's rule for a list of target names: the module's name is one, or ends with ".one"."""
    return any(name == t or name.endswith("." + t) for t in targets)


def mark_static(tensor) -> None:
    """Tell torch.compile that ``tensor`` keeps its address and is written in place: a CUDA
    graph reads it where it is instead of copying it into the graph before each replay."""
    import torch

    torch._dynamo.mark_static_address(tensor)


class _Layer:
    """The slots of one adapted Linear and the hook that adds their LoRA to its output."""

    def __init__(self, owner: LoraSlots, group: str, name: str, linear, count: int, rank: int):
        self.owner, self.group, self.name = owner, group, name
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.device, self.dtype = linear.weight.device, linear.weight.dtype
        self.count = count
        self.static: _StaticState | None = None  # set by LoraSlots for a compiled UNet
        self.allocate(rank)
        self.handle = linear.register_forward_hook(self._hook)

    def allocate(self, rank: int) -> None:
        import torch

        kw = {"device": self.device, "dtype": self.dtype}
        self.A = torch.zeros(self.count, rank, self.in_features, **kw)
        self.B = torch.zeros(self.count, self.out_features, rank, **kw)
        if self.static is not None:
            mark_static(self.A)
            mark_static(self.B)
        # per slot: the adapter's rank on this layer (0: none) and B as a contiguous [out, r]
        self.rank = [0] * self.count
        self.exact_B: list[Any] = [None] * self.count

    @property
    def nbytes(self) -> int:
        return self.A.nbytes + self.B.nbytes

    def write(self, slot: int, a, b) -> None:
        """Copy one adapter's A [r, in], B [out, r] into ``slot``; beyond r stays zero."""
        r, old = a.shape[0], self.rank[slot]
        if a.shape[1] != self.in_features or b.shape != (self.out_features, r):
            raise SlotError(
                f"{self.group}.{self.name}: LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do not "
                f"fit a layer of {self.in_features} -> {self.out_features}"
            )
        self.A[slot, :r].copy_(a, non_blocking=True)
        self.B[slot, :, :r].copy_(b, non_blocking=True)
        if old > r:  # what the previous adapter left beyond this one's rank
            self.A[slot, r:old].zero_()
            self.B[slot, :, r:old].zero_()
        self.rank[slot] = r
        full = r == self.A.shape[1]
        self.exact_B[slot] = self.B[slot] if full else self.B[slot, :, :r].contiguous()

    def clear(self, slot: int) -> None:
        if self.rank[slot]:
            self.A[slot].zero_()
            self.B[slot].zero_()
        self.rank[slot], self.exact_B[slot] = 0, None

    def _hook(self, module, args, output):
        plan = self.owner.plan
        delta = None if plan is None else plan.delta(self, args[0])
        return None if delta is None else output + delta


class _Fused:
    """A projection fused by diffusers (``fuse_qkv_projections``: ``to_qkv`` of a self-attention,
    ``to_kv`` of a cross-attention) whose parts have slots: the fused layer's output is the
    parts' outputs side by side, so their deltas are added side by side. (The parts' own
    hooks no longer run: the attention calls the fused layer instead.)"""

    def __init__(self, owner: LoraSlots, parts: list[tuple[_Layer | None, int]], linear) -> None:
        self.owner, self.parts = owner, parts  # (the part's slots or None, its out_features)
        self.handle = linear.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        import torch

        plan = self.owner.plan
        if plan is None:
            return None
        x = args[0]
        deltas = [None if layer is None else plan.delta(layer, x) for layer, _ in self.parts]
        if all(d is None for d in deltas):
            return None
        deltas = [
            x.new_zeros(*x.shape[:-1], width) if d is None else d
            for d, (_, width) in zip(deltas, self.parts, strict=True)
        ]
        return output + torch.cat(deltas, dim=-1)


class _Single:
    """Every row uses one slot: peft's forward, operation for operation. (Each plan gives a
    layer's ``delta``; the layer's hook adds it to the output, as peft adds its LoRA.)"""

    def __init__(self, slot: int, scales: dict[str, float]) -> None:
        self.slot, self.scales = slot, scales

    def delta(self, layer: _Layer, x):
        import torch.nn.functional as F

        r = layer.rank[self.slot]
        if not r:
            return None
        a = layer.A[self.slot, :r]  # contiguous [r, in], as peft's lora_A.weight
        # peft: result = result + lora_B(lora_A(dropout(x))) * scaling (dropout: identity)
        return F.linear(F.linear(x, a), layer.exact_B[self.slot]) * self.scales[layer.group]


class _StaticState:
    """The device tensors a static plan reads: the slot in use and the scale per group (0: the
    bare base), one set per device and dtype of the layers."""

    def __init__(self, device, dtype) -> None:
        import torch

        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.scales = {g: torch.zeros((), dtype=dtype, device=device) for g in GROUPS}
        mark_static(self.slot)
        for scale in self.scales.values():
            mark_static(scale)

    def set(self, slot: int, scales: dict[str, float]) -> None:
        self.slot.fill_(slot)
        for group, scale in self.scales.items():
            scale.fill_(scales.get(group, 0.0))


class _Static:
    """Every row uses the slot and scales in the layer's :class:`_StaticState`; the values are
    read on the device, so a compiled graph serves every user (see the module docstring)."""

    def delta(self, layer: _Layer, x):
        import torch.nn.functional as F

        state = layer.static
        a = layer.A.index_select(0, state.slot)[0]  # [R, in], contiguous: peft's lora_A.weight
        b = layer.B.index_select(0, state.slot)[0]  # [out, R]
        return F.linear(F.linear(x, a), b) * state.scales[layer.group]


class _Rows:
    """Each prompt of a batch its own slot. The pipeline lays rows out as
    text encoder: one row per prompt; UNet: each prompt's ``num_images`` rows in a block, and
    with classifier-free guidance the whole block list twice (unconditional, then conditional)."""

    def __init__(self, slots: list[int], scales: dict[str, list[float]], num_images: int) -> None:
        self.slots, self.scales, self.num_images = slots, scales, num_images
        self._index: dict[tuple[str, int, Any], tuple[Any, Any]] = {}
        self.active = {g: any(s != 0.0 for s in scales[g]) for g in GROUPS}

    def _rows(self, layer: _Layer, n_rows: int):
        key = (layer.group, n_rows, layer.device)
        if key not in self._index:
            import torch

            prompts, n = len(self.slots), self.num_images
            if layer.group == TEXT_ENCODER and n_rows == prompts:
                reps, tiles = 1, 1
            elif layer.group == UNET and n_rows in (prompts * n, 2 * prompts * n):
                reps, tiles = n, n_rows // (prompts * n)
            else:
                raise SlotError(
                    f"batched LoRA: a {layer.group} call with {n_rows} rows does not match "
                    f"{prompts} prompts x {n} images"
                )
            slots = torch.tensor(self.slots).repeat_interleave(reps).repeat(tiles)
            scale = torch.tensor(self.scales[layer.group], dtype=torch.float64)
            scale = scale.repeat_interleave(reps).repeat(tiles).to(layer.dtype)
            self._index[key] = (slots.to(layer.device), scale.to(layer.device).view(-1, 1, 1))
        return self._index[key]

    def delta(self, layer: _Layer, x):
        import torch

        if not self.active[layer.group]:
            return None
        n_rows = x.shape[0]
        slots, scale = self._rows(layer, n_rows)
        a = layer.A.index_select(0, slots)  # [rows, R, in]
        b = layer.B.index_select(0, slots)  # [rows, out, R]
        h = torch.bmm(x.reshape(n_rows, -1, layer.in_features), a.transpose(1, 2))
        delta = torch.bmm(h, b.transpose(1, 2)) * scale
        return delta.reshape(*x.shape[:-1], layer.out_features)


class LoraSlots:
    """``count`` LoRA slots on every target layer of a pipeline's UNet and text encoder.

    Slots are filled by :meth:`load` (least recently used first); :meth:`use` and :meth:`rows`
    set what the next pipeline call applies, :meth:`off` applies nothing (the bare base). The
    slot rank starts at ``rank`` and grows to the largest adapter rank seen (the slots are then
    reallocated and emptied).
    """

    def __init__(
        self,
        pipe,
        count: int = 8,
        rank: int = 8,
        targets: dict[str, Sequence[str]] | None = None,
        *,
        static: bool | None = None,
    ) -> None:
        """``static``: plan with device tensors (see the module docstring); None: when the
        pipeline's UNet is compiled, decided at the first :meth:`use` or :meth:`off` (the UNet
        may be compiled after the slots are made, before its first call)."""
        import torch

        if count < 1 or rank < 1:
            raise ValueError(f"LoRA slots: count and rank must be >= 1 (got {count}, {rank})")
        if targets is None:
            from ..train.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS

            targets = {UNET: UNET_TARGETS, TEXT_ENCODER: TEXT_ENCODER_TARGETS}
        self.count = count
        self.plan: _Single | _Rows | _Static | None = None
        self._unet = getattr(pipe, UNET, None)
        self._static_wanted = static
        self._static: _Static | None = None
        self._states: dict[tuple[Any, Any], _StaticState] = {}
        self._fused: dict[int, _Fused] = {}  # id of a fused projection -> its hook
        self.layers: dict[tuple[str, str], _Layer] = {}
        self.module_names: dict[str, tuple[str, ...]] = {}
        self.ranks: dict[str, int] = {}
        for group in GROUPS:
            model = getattr(pipe, group, None)
            if model is None or group not in targets:
                continue
            self.module_names[group] = tuple(n for n, _ in model.named_modules())
            self.ranks[group] = rank
            # frozen, as peft freezes a base it adds a LoRA to: torch's CPU linear takes
            # another (differently rounded) fp16 path for a weight that requires grad
            model.requires_grad_(False)
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and is_target(name, targets[group]):
                    self.layers[group, name] = _Layer(self, group, name, module, count, rank)
        if not self.layers:
            raise SlotError("no layer of the pipeline matches the LoRA targets")
        self._keys: list[Any] = [None] * count  # what each slot holds
        self._scales: list[dict[str, float]] = [{} for _ in range(count)]
        self._order: list[int] = list(range(count))  # least recently used first

    # ------------------------------------------------------------ what the slots hold

    @property
    def nbytes(self) -> int:
        """Memory of the slots on their device (fixed: it does not grow with users)."""
        return sum(layer.nbytes for layer in self.layers.values())

    def shapes(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(group, layer) -> (in_features, out_features) of every slotted layer."""
        return {k: (v.in_features, v.out_features) for k, v in self.layers.items()}

    def resident(self) -> list[Any]:
        return list(self._keys)

    def slot_of(self, key) -> int | None:
        try:
            return self._keys.index(key)
        except ValueError:
            return None

    def touch(self, slot: int) -> None:
        """Mark ``slot`` as just used (the least recently used slot is refilled first)."""
        self._order.remove(slot)
        self._order.append(slot)

    def load(self, key, adapter: LoraWeights, keep: Sequence[int] = ()) -> int:
        """The slot holding ``key`` (``adapter`` copied into the least recently used slot not in
        ``keep`` unless it is already there)."""
        slot = self.slot_of(key)
        if slot is None:
            self._grow(adapter)
            free = [s for s in self._order if s not in keep]
            if not free:
                raise SlotError(f"all {self.count} LoRA slots are in use by this batch")
            slot = free[0]
            self._write(slot, key, adapter)
        self.touch(slot)
        return slot

    def drop(self, key) -> None:
        """Forget ``key`` (its slot is refilled before it is used again)."""
        if (slot := self.slot_of(key)) is not None:
            self._keys[slot] = None

    def _grow(self, adapter: LoraWeights) -> None:
        for group in self.ranks:
            if (r := adapter.rank(group)) > self.ranks[group]:
                log.info("LoRA slots of %s grow from rank %d to %d", group, self.ranks[group], r)
                self.plan = None
                for layer in self.layers.values():
                    if layer.group == group:
                        layer.allocate(r)
                self.ranks[group] = r
                self._keys = [None] * self.count

    def _write(self, slot: int, key, adapter: LoraWeights) -> None:
        unknown = set(adapter.weights) - set(self.layers)
        if unknown:
            raise SlotError(
                f"adapter has LoRA weights for layers without slots: {sorted(unknown)[:3]}"
            )
        self._keys[slot] = None  # not usable until the copy is complete
        if isinstance(self.plan, _Single) and self.plan.slot == slot:
            self.plan = None
        elif self.plan is self._static and self._static is not None:
            self.off()  # the slot in use is being overwritten
        try:
            for name, layer in self.layers.items():
                if name in adapter.weights:
                    layer.write(slot, *adapter.weights[name])
                else:
                    layer.clear(slot)
        except BaseException:
            for layer in self.layers.values():  # nothing half-written stays behind
                layer.A[slot].zero_()
                layer.B[slot].zero_()
                layer.rank[slot], layer.exact_B[slot] = 0, None
            raise
        self._scales[slot] = dict(adapter.scales)
        self._keys[slot] = key

    # ------------------------------------------------------------ what the next call applies

    @property
    def static(self) -> bool:
        """Whether the plan lives in device tensors (a compiled UNet; see the module docstring)."""
        if self._static_wanted is not None:
            return self._static_wanted
        from ..base.pipeline import is_compiled

        return self._unet is not None and is_compiled(self._unet)

    def _attach_fused(self) -> None:
        """Hooks on the UNet's fused projections (compile_unet fuses them before compiling;
        the static plan comes after): without them the fused parts' LoRA would be lost."""
        if self._unet is None:
            return
        for name, module in self._unet.named_modules():
            for fused, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v"))):
                linear = getattr(module, fused, None)
                if linear is None or id(linear) in self._fused:
                    continue
                found = [
                    (self.layers.get((UNET, f"{name}.{part}")), getattr(module, part).out_features)
                    for part in parts
                ]
                if any(layer is not None for layer, _ in found):
                    self._fused[id(linear)] = _Fused(self, found, linear)

    def _static_plan(self, slot: int, scales: dict[str, float]) -> _Static:
        if self._static is None:
            self._attach_fused()
            for layer in self.layers.values():
                key = (layer.device, layer.dtype)
                if key not in self._states:
                    self._states[key] = _StaticState(layer.device, layer.dtype)
                layer.static = self._states[key]
                mark_static(layer.A)
                mark_static(layer.B)
            self._static = _Static()
        for state in self._states.values():
            state.set(slot, scales)
        return self._static

    def off(self) -> None:
        """The bare base (and what a peft adapter loaded over these layers applies). Static:
        the same plan with every scale 0, so the bare base runs the users' graph."""
        self.plan = self._static_plan(0, {}) if self.static else None

    def use(self, slot: int) -> None:
        """Every row of the next pipeline calls uses ``slot``."""
        if self._keys[slot] is None:
            raise SlotError(f"LoRA slot {slot} is empty")
        if self.static:
            self.plan = self._static_plan(slot, self._scales[slot])
        else:
            self.plan = _Single(slot, self._scales[slot])

    @contextlib.contextmanager
    def rows(self, slots: Sequence[int | None], num_images: int) -> Iterator[None]:
        """Within the block, prompt ``i`` of the pipeline call uses ``slots[i]`` (None: none)."""
        for s in slots:
            if s is not None and self._keys[s] is None:
                raise SlotError(f"LoRA slot {s} is empty")
        scales = {
            g: [0.0 if s is None else self._scales[s].get(g, 0.0) for s in slots] for g in GROUPS
        }
        self.plan = _Rows([0 if s is None else s for s in slots], scales, num_images)
        try:
            with _eager_if(self.static):
                yield
        finally:
            self.plan = None
            if self.static:
                self.off()

    def close(self) -> None:
        """Remove the hooks (the pipeline is the bare base again)."""
        self.plan = None
        for layer in self.layers.values():
            layer.handle.remove()
        for fused in self._fused.values():
            fused.handle.remove()
        self.layers.clear()
        self._fused.clear()


@contextlib.contextmanager
def _eager_if(eager: bool) -> Iterator[None]:
    """Run torch.compile'd modules eagerly within the block (torch >= 2.6), when ``eager``."""
    if not eager:
        yield
        return
    import torch

    with torch.compiler.set_stance("force_eager"):
        yield
