"""Adapters activated through preallocated LoRA slots give the pixels of today's path.

The reference is today's path: the adapter loaded into a pipeline of the tiny base with
``load_adapter`` (diffusers' ``load_lora_weights``), ``generate_images``, same seed. Every slot
path -- read cold from disk into one slot, copied from the host cache into one slot, already
resident in one of several slots -- must give exactly the same pixels (``np.array_equal``), for
real, distinct adapters: the trained fixture (rank 4 in rank-8 slots, alpha != rank) and random
ones (``fullsize.random_adapter``, rank 8 and rank 2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.images import pixels

from avatarforge.adapter import (
    WEIGHTS_FILE,
    AdapterError,
    load_adapter,
    read_adapter,
    save_adapter,
    unload_adapter,
)
from avatarforge.base.pipeline import load_pipeline
from avatarforge.fullsize import random_adapter
from avatarforge.generate import GenArgs, generate_images
from avatarforge.serving.adapter_cache import SlotAdapterCache
from avatarforge.serving.host_adapters import HostAdapterCache, NotSlottable, files_signature
from avatarforge.serving.lora_slots import LoraSlots, LoraWeights, SlotError

PROMPT = "a photo of <<TOK>> person"
ARGS = GenArgs(steps=2, height=64, width=64, seed=3)
BIG = 2**30
RANK_2 = {"unet_rank": 2, "unet_alpha": 3.0, "text_encoder_rank": 2, "text_encoder_alpha": 1.0}


def _generate(pipe, args: GenArgs = ARGS) -> np.ndarray:
    return pixels(generate_images(pipe, PROMPT, "blurry", args)[0])


@pytest.fixture(scope="module")
def adapters(trained_adapter, tiny_base, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("slot-adapters")
    return {
        "trained": trained_adapter,  # UNet r4/alpha 2, text encoder r4/alpha 4
        "r8a": random_adapter(tiny_base, out / "r8a", seed=1, weight_std=0.05),
        "r8b": random_adapter(tiny_base, out / "r8b", seed=2, weight_std=0.05),
        "r2": random_adapter(tiny_base, out / "r2", seed=3, weight_std=0.05, **RANK_2),
    }


@pytest.fixture(scope="module")
def reference(adapters, tiny_base) -> dict[str, np.ndarray]:
    """Today's path: each adapter loaded with load_lora_weights, then unloaded."""
    pipe = load_pipeline(tiny_base, device="cpu")
    images = {"bare": _generate(pipe)}
    for name, folder in adapters.items():
        load_adapter(pipe, folder, tiny_base, "reference")
        images[name] = _generate(pipe)
        unload_adapter(pipe, "reference")
    return images


@pytest.fixture(scope="module")
def pipe(tiny_base):
    """One shared pipeline; every test removes its slots (SlotAdapterCache.clear)."""
    return load_pipeline(tiny_base, device="cpu")


def test_the_adapters_really_differ(reference):
    names = ["bare", "trained", "r8a", "r8b", "r2"]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.array_equal(reference[a], reference[b]), (a, b)


@pytest.mark.parametrize(
    ("slots", "cache_bytes"),
    [(1, 0), (1, BIG), (4, BIG)],
    ids=["cold-from-disk", "host-cache", "resident"],
)
def test_every_slot_path_gives_the_pixels_of_load_lora_weights(
    pipe, tiny_base, adapters, reference, slots, cache_bytes
):
    cache = SlotAdapterCache(pipe, tiny_base, slots=slots, host_cache_bytes=cache_bytes)
    try:
        # switch back and forth, through the bare base, so that each path is really taken
        for name in ["r8a", "trained", "r8b", None, "r8a", "r2", "trained", "r2"]:
            cache.activate(None if name is None else str(adapters[name]))
            assert np.array_equal(_generate(pipe), reference[name or "bare"]), name
        assert cache.fallback.loaded == []  # no adapter needed load_lora_weights
        # one read per adapter, or per activation that misses the one slot when nothing is kept
        assert cache.host.reads == (7 if cache_bytes == 0 else 4)
    finally:
        cache.clear()
    assert np.array_equal(_generate(pipe), reference["bare"])  # hooks removed: the bare base


def test_adapter_replaced_on_disk_is_read_again(pipe, tiny_base, adapters, reference, tmp_path):
    # SageMaker MME unpacks an updated <user>.tar.gz into the old user's folder
    folder = tmp_path / "alice"
    shutil.copytree(adapters["r8a"], folder)
    cache = SlotAdapterCache(pipe, tiny_base, slots=2, host_cache_bytes=BIG)
    try:
        cache.activate(str(folder))
        assert np.array_equal(_generate(pipe), reference["r8a"])
        shutil.rmtree(folder)
        shutil.copytree(adapters["r8b"], folder)  # new files: another inode and ctime
        cache.activate(str(folder))
        assert np.array_equal(_generate(pipe), reference["r8b"])
        assert cache.host.reads == 2 and len(cache.host) == 1
        assert [k[0] for k in cache.slots.resident() if k] == [str(folder)]  # old copy dropped
    finally:
        cache.clear()


def test_corrupt_adapter_fails_and_leaves_the_slots_as_they_were(
    pipe, tiny_base, adapters, reference, tmp_path
):
    broken = tmp_path / "broken"
    shutil.copytree(adapters["r8a"], broken)
    data = bytearray((broken / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the tensors: the recorded sha256 catches it
    (broken / WEIGHTS_FILE).write_bytes(bytes(data))
    cache = SlotAdapterCache(pipe, tiny_base, slots=2, host_cache_bytes=BIG)
    try:
        cache.activate(str(adapters["r8b"]))
        with pytest.raises(AdapterError, match="sha256"):
            cache.activate(str(broken))
        with pytest.raises(AdapterError, match="no such directory"):
            cache.activate(str(tmp_path / "missing"))
        assert len(cache.host) == 1 and sum(k is not None for k in cache.slots.resident()) == 1
        assert np.array_equal(_generate(pipe), reference["r8b"])  # still r8b, whole
    finally:
        cache.clear()


def test_a_failed_slot_write_leaves_nothing_half_written(pipe):
    slots = LoraSlots(pipe, count=2, rank=4)
    try:
        names = sorted(slots.layers)
        good = {n: (torch.ones(4, i), torch.ones(o, 4)) for n, (i, o) in slots.shapes().items()}
        bad = dict(good)
        bad[names[len(names) // 2]] = (torch.ones(4, 3), torch.ones(3, 4))  # wrong shape
        with pytest.raises(SlotError, match="do not fit"):
            slots.load("bad", LoraWeights(bad, {"unet": 1.0, "text_encoder": 1.0}))
        assert slots.resident() == [None, None]
        assert all(not layer.A.any() and not layer.B.any() for layer in slots.layers.values())
        with pytest.raises(SlotError, match="empty"):
            slots.use(0)
    finally:
        slots.close()


def _rslora_copy(source: Path, out: Path) -> Path:
    """The same adapter with use_rslora set (scale alpha/sqrt(r)): the slots compute plain LoRA,
    so it must go the old way."""
    from safetensors import safe_open

    with safe_open(source / WEIGHTS_FILE, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    configs: dict[str, dict] = {}
    for key, value in header.items():
        group, _, name = key.partition(".")
        configs.setdefault(group, {})[name] = value
    configs["unet"]["use_rslora"] = True
    layers = {
        g: {k.removeprefix(f"{g}."): v for k, v in tensors.items() if k.startswith(f"{g}.")}
        for g in ("unet", "text_encoder")
    }
    return save_adapter(
        out, layers["unet"], layers["text_encoder"], read_adapter(source),
        unet_lora_config=configs["unet"], text_encoder_lora_config=configs["text_encoder"],
    )  # fmt: skip


def test_adapter_the_slots_cannot_reproduce_goes_the_old_way(
    pipe, tiny_base, adapters, reference, tmp_path
):
    rslora = _rslora_copy(adapters["r8a"], tmp_path / "rslora")
    ref = load_pipeline(tiny_base, device="cpu")
    load_adapter(ref, rslora, tiny_base, "rslora")
    expected = _generate(ref)
    assert not np.array_equal(expected, reference["r8a"])  # rsLoRA scales differently
    cache = SlotAdapterCache(pipe, tiny_base, slots=2, host_cache_bytes=BIG)
    try:
        assert cache.batchable(str(rslora)) is False
        steps = [(rslora, expected), (adapters["r8b"], reference["r8b"])]
        for folder, image in [*steps, (rslora, expected), (None, reference["bare"])]:
            cache.activate(None if folder is None else str(folder))
            assert np.array_equal(_generate(pipe), image), folder
        assert cache.fallback.loaded == [str(rslora)]
        cache.fallback.clear()  # peft's layers removed: the slots' layers are the ones back
        cache.activate(str(adapters["r8a"]))
        assert np.array_equal(_generate(pipe), reference["r8a"])
        # remembered as such: not read again
        entry = cache.host.get(str(rslora), files_signature(rslora), lambda: None)
        assert isinstance(entry, NotSlottable) and "use_rslora" in entry.reason
    finally:
        cache.clear()


def test_memory_slots_fixed_host_cache_bounded(pipe, tiny_base, adapters):
    one = SlotAdapterCache(pipe, tiny_base, slots=2, host_cache_bytes=BIG)
    one.activate(str(adapters["r8a"]))
    per_adapter = one.memory()["host_cache_bytes"]
    one.clear()
    # room for two rank-8 adapters: the least recently used goes
    cache = SlotAdapterCache(pipe, tiny_base, slots=2, host_cache_bytes=2 * per_adapter + 10)
    try:
        slot_bytes = cache.memory()["slot_bytes"]
        for name in ["r8a", "r8b", "trained", "r2", "r8a"]:
            cache.activate(str(adapters[name]))
            memory = cache.memory()
            assert memory["slot_bytes"] == slot_bytes  # the device side never grows
            assert memory["host_cache_bytes"] <= 2 * per_adapter + 10
        assert str(adapters["r8a"]) in cache.host and str(adapters["r8b"]) not in cache.host
    finally:
        cache.clear()


def test_host_cache_is_bounded_in_bytes_and_lru():
    cache = HostAdapterCache(limit_bytes=250)
    reads = []

    def entry(name, size, signature=(1,)):
        def read():
            reads.append(name)
            return NotSlottable(name, signature, "test", nbytes=size)

        return read

    cache.get("a", (1,), entry("a", 100))
    cache.get("b", (1,), entry("b", 100))
    cache.get("a", (1,), entry("a", 100))  # a hit: a is now the most recent
    cache.get("c", (1,), entry("c", 100))  # 300 > 250: b goes
    assert "b" not in cache and "a" in cache and cache.nbytes == 200
    cache.get("d", (1,), entry("d", 300))  # larger than the whole cache: served, not kept
    assert "d" not in cache and cache.nbytes == 200
    cache.get("a", (2,), entry("a", 100, (2,)))  # replaced on disk: read again
    assert reads == ["a", "b", "c", "d", "a"]
    with pytest.raises(ValueError, match=">= 0"):
        HostAdapterCache(-1)


def test_slot_rank_grows_for_a_larger_adapter(pipe, tiny_base, adapters, reference, tmp_path):
    rank_16 = {"unet_rank": 16, "unet_alpha": 16.0}
    big = random_adapter(tiny_base, tmp_path / "r16", seed=5, weight_std=0.05, **rank_16)
    ref = load_pipeline(tiny_base, device="cpu")
    load_adapter(ref, big, tiny_base, "big")
    cache = SlotAdapterCache(pipe, tiny_base, slots=2, host_cache_bytes=BIG, rank=8)
    try:
        cache.activate(str(adapters["r8a"]))
        cache.activate(str(big))
        assert cache.slots.ranks["unet"] == 16 and np.array_equal(_generate(pipe), _generate(ref))
        cache.activate(str(adapters["r8a"]))  # emptied by the growth: copied in again
        assert np.array_equal(_generate(pipe), reference["r8a"])
    finally:
        cache.clear()
