"""The full-size SD 2.1-base from configs: its shapes, its identity, benchmark adapters."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from avatarforge.adapter import read_adapter
from avatarforge.base.build import clip_bpe_path, clip_tokenizer
from avatarforge.base.identity import BaseError
from avatarforge.base.pipeline import load_pipeline
from avatarforge.fullsize import (
    FULL_ID_PREFIX,
    PARAM_COUNTS,
    build_full_base,
    full_components,
    param_counts,
    random_adapter,
)
from avatarforge.generate import GenArgs, generate_images


def test_sd21_shapes_and_parameter_counts_without_memory():
    components = full_components(device="meta")  # shapes only: no weights are allocated
    counts = param_counts(components)
    assert counts == PARAM_COUNTS
    # the published SD 2.1 figures (DESIGN.md): 865.9M, 83.7M, 340.4M
    assert {k: round(v / 1e6, 1) for k, v in counts.items()} == {
        "unet": 865.9,
        "vae": 83.7,
        "text_encoder": 340.4,
    }
    unet, vae, text_encoder = (components[k] for k in ("unet", "vae", "text_encoder"))
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size == 1024
    assert unet.config.use_linear_projection is True
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8  # 512 px -> 64 latent
    assert text_encoder.config.num_hidden_layers == 23  # ViT-H without its last layer
    assert components["scheduler"].config.prediction_type == "epsilon"
    assert {p.dtype for p in unet.parameters()} == {torch.float32}
    half = full_components(device="meta", dtype="float16")["unet"]
    assert {p.dtype for p in half.parameters()} == {torch.float16}


def test_tokenizer_from_a_copied_vocabulary_file(tmp_path):
    # where open-clip-torch is not installed (the GPU machines), the BPE file is passed as a path
    copy = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    shutil.copyfile(clip_bpe_path(), copy)
    tokenizer = clip_tokenizer(copy)
    assert len(tokenizer) == 49408 and tokenizer.pad_token == "!"
    assert tokenizer("a photo of").input_ids == [49406, 320, 1125, 539, 49407]


def test_a_folder_holding_another_base_is_refused(tiny_base):
    with pytest.raises(BaseError, match=f"holds avatarforge/tiny-sd21@seed0, not {FULL_ID_PREFIX}"):
        build_full_base(tiny_base.path)


def test_random_adapters_are_real_distinct_and_load(tiny_base, trained_adapter, tmp_path):
    from safetensors import safe_open

    a = random_adapter(tiny_base, tmp_path / "a", seed=1)
    again = random_adapter(tiny_base, tmp_path / "again", seed=1)
    b = random_adapter(tiny_base, tmp_path / "b", seed=2)
    meta = read_adapter(a)  # the one format: metadata + sha256-checked weights
    assert (meta.base_hash, meta.unet_rank, meta.text_encoder_rank) == (
        tiny_base.content_hash,
        8,
        8,
    )
    assert meta.weights_sha256 == read_adapter(again).weights_sha256  # seeded
    assert meta.weights_sha256 != read_adapter(b).weights_sha256

    def contents(folder):
        with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as f:
            return set(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])

    keys, lora_meta = contents(a)
    trained_keys, _ = contents(trained_adapter)
    assert keys == trained_keys  # exactly the layers a training run saves
    assert (lora_meta["unet.r"], lora_meta["unet.lora_alpha"]) == (8, 8.0)
    assert (lora_meta["text_encoder.r"], lora_meta["text_encoder.lora_alpha"]) == (8, 8.0)

    from avatarforge.adapter import load_adapter, unload_adapter

    pipe = load_pipeline(tiny_base, device="cpu")
    args = GenArgs(steps=2, height=64, width=64)
    bare = np.asarray(generate_images(pipe, "a photo of person", None, args)[0], dtype=int)
    images = []
    for name, folder in (("a", a), ("b", b)):
        load_adapter(pipe, folder, tiny_base, name)
        images.append(np.asarray(generate_images(pipe, "a photo of person", None, args)[0], int))
        unload_adapter(pipe, name)
    assert np.abs(images[0] - bare).max() > 0  # B is not zero: the adapter changes the image
    assert np.abs(images[0] - images[1]).max() > 0


@pytest.mark.slow
def test_full_base_is_built_once_and_loads_like_any_base():
    """Built on this CPU (~1 min, 2.5 GB fp16) into the build cache, then reused."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    info = build_full_base(device="cpu")
    assert info.base_id == f"{FULL_ID_PREFIX}@seed0"
    assert build_full_base(device="cpu") == info  # cached: same identity, nothing rebuilt
    counts = {}
    for name in PARAM_COUNTS:
        (weights,) = (info.path / name).glob("*.safetensors")
        with safe_open(str(weights), "pt") as f:
            counts[name] = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118
            assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F16"
    assert counts == PARAM_COUNTS
    unet_config = UNet2DConditionModel.load_config(info.path, subfolder="unet")
    assert unet_config["block_out_channels"] == [320, 640, 1280, 1280]
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(info.path, subfolder="tokenizer")
    assert tokenizer("a photo of").input_ids == [49406, 320, 1125, 539, 49407]
