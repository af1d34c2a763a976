"""The shared base's UNet under torch.compile: users switch without a recompile or a graph break.

torch.compile specialises a traced graph on the Python values it reads; the LoRA slots' plan of a
compiled UNet keeps the slot and the scales in device tensors instead, so every user runs the one
graph (and a CUDA graph replays with the new values). Traced here with the "eager" backend:
dynamo's tracing, guards and graph breaks are those of inductor's, without its code generation
(which only a GPU makes worth its minutes). The pixels are checked against the eager slots and
against today's reference, ``load_lora_weights``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from fixtures.images import pixels

from avatarforge.adapter import load_adapter, unload_adapter
from avatarforge.base import pipeline as base_pipeline
from avatarforge.base.pipeline import load_pipeline, prepare_for_serving
from avatarforge.fullsize import random_adapter
from avatarforge.generate import GenArgs, generate_batch, generate_images
from avatarforge.serving.adapter_cache import SlotAdapterCache
from avatarforge.serving.config import ServingConfig
from avatarforge.serving.shared_base import SharedBase

PROMPT = "a photo of <<TOK>> person"
ARGS = GenArgs(steps=2, height=64, width=64, seed=3)
RANK_2 = {"unet_rank": 2, "unet_alpha": 3.0, "text_encoder_rank": 2, "text_encoder_alpha": 1.0}


def _generate(pipe) -> np.ndarray:
    return pixels(generate_images(pipe, PROMPT, "blurry", ARGS)[0])


def _counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), sum(counters["graph_break"].values())


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("compile-adapters")
    return {
        "r8a": random_adapter(tiny_base, out / "r8a", seed=1, weight_std=0.05),
        "r8b": random_adapter(tiny_base, out / "r8b", seed=2, weight_std=0.05),
        "r2": random_adapter(tiny_base, out / "r2", seed=3, weight_std=0.05, **RANK_2),
    }


@pytest.fixture(scope="module")
def reference(adapters, tiny_base):
    """Today's path: each adapter loaded with load_lora_weights."""
    pipe = load_pipeline(tiny_base, device="cpu")
    images = {None: _generate(pipe)}
    for name, folder in adapters.items():
        load_adapter(pipe, folder, tiny_base, "reference")
        images[name] = _generate(pipe)
        unload_adapter(pipe, "reference")
    return images


@pytest.mark.slow
def test_users_switch_on_a_compiled_unet_without_recompiling(
    adapters, reference, tiny_base, tmp_path, monkeypatch
):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "cache"))  # restored after the test
    torch._dynamo.reset()
    # as SharedBase.from_params prepares the shared base: slots first, then the compile and
    # its warm-up with the bare base's plan
    shared = SharedBase(load_pipeline(tiny_base, device="cpu"), tiny_base, batch_max_images=2)
    try:
        seconds = prepare_for_serving(
            shared.pipe, "on", tmp_path / "cache", backend="eager", warm_up_size=64,
            before_warm_up=lambda: shared.cache.activate(None),
        )  # fmt: skip
        assert seconds > 0 and shared.cache.slots.static  # decided by the compiled UNet
        # q, k, v fused into one product: the slots add their LoRA on the fused layers
        fused = [m for m in shared.pipe.unet.modules() if hasattr(m, "to_qkv")]
        assert fused and len(shared.cache.slots._fused) == 2 * len(fused)  # + to_kv each
        graphs, breaks = _counts()
        assert graphs == 1 and breaks == 0
        # users come and go through both slots (r2 evicts one), and the bare base
        for name in ("r8a", "r8b", "r2", None, "r8a", "r2", "r8b"):
            adapter = None if name is None else str(adapters[name])
            got = pixels(shared.generate(PROMPT, "blurry", ARGS, adapter)[0])
            # a smaller rank reads the slot's zeros too: exact zeros, rounding only
            assert np.abs(got.astype(int) - reference[name]).max() <= (1 if name == "r2" else 0)
        assert _counts() == (graphs, breaks), "a user switch recompiled the UNet"
        # a batch with a LoRA per row runs the UNet eagerly: no compile for its shape
        rows = [(PROMPT, "blurry", ARGS), (PROMPT, "blurry", ARGS)]
        with shared.cache.rows([str(adapters["r8a"]), str(adapters["r8b"])], 1):
            batch = generate_batch(shared.pipe, rows)
        assert _counts() == (graphs, breaks)
        assert np.abs(pixels(batch[0][0]).astype(int) - reference["r8a"]).max() <= 2
        got = pixels(shared.generate(PROMPT, "blurry", ARGS, str(adapters["r8a"]))[0])
        assert np.array_equal(got, reference["r8a"])  # the single plan is back
        assert _counts() == (graphs, breaks)
    finally:
        shared.cache.clear()
        torch._dynamo.reset()


def test_the_static_plan_gives_the_pixels_of_the_single_slot_plan(adapters, reference, tiny_base):
    """Without compiling (what the compiled graph runs, traced): same pixels as today's path."""
    pipe = load_pipeline(tiny_base, device="cpu")
    cache = SlotAdapterCache(pipe, tiny_base, slots=2)
    cache.slots._static_wanted = True
    try:
        for name in ("r8a", "r8b", None, "r2"):
            cache.activate(None if name is None else str(adapters[name]))
            got = _generate(pipe)
            assert np.abs(got.astype(int) - reference[name]).max() <= (1 if name == "r2" else 0)
    finally:
        cache.clear()


def test_torch_compile_setting_is_off_on_a_cpu_and_round_trips_through_the_instance_env():
    assert ServingConfig().torch_compile == "auto"
    assert base_pipeline.wants_compile("auto", "cuda:0")
    assert not base_pipeline.wants_compile("auto", "cpu")
    assert base_pipeline.wants_compile("on", "cpu") and not base_pipeline.wants_compile(
        "off", "cuda"
    )
    env = ServingConfig(torch_compile="off").to_env()  # an instance's setting, not a package's
    assert env["AVATARFORGE_SERVING_TORCH_COMPILE"] == "off"
    assert ServingConfig.from_env(env).torch_compile == "off"
    from avatarforge.settings import ConfigError

    with pytest.raises(ConfigError, match="torch_compile"):
        ServingConfig(torch_compile="max")


def test_a_cpu_pipeline_is_left_eager_and_the_cache_folder_is_kept(
    tiny_base, tmp_path, monkeypatch
):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    pipe = load_pipeline(tiny_base, device="cpu")
    assert prepare_for_serving(pipe, "auto", tmp_path / "cache") == 0.0
    assert not base_pipeline.is_compiled(pipe.unet)
    folder = base_pipeline.use_compile_cache(tmp_path / "cache")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder) == str(tmp_path / "cache")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")
    # one process, one cache: a second folder does not move it
    assert base_pipeline.use_compile_cache(tmp_path / "other") == folder
