"""The embedded tiny base: deterministic, loads with stock diffusers, generates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from avatarforge.base.config import BaseConfig, resolve_base
from avatarforge.base.identity import (
    INFO_FILE,
    BaseError,
    check_same_base,
    content_hash,
    read_base_info,
)
from avatarforge.base.tiny import build_tiny_base
from avatarforge.generate import GenArgs, generate_images
from avatarforge.settings import ConfigError


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, tiny_base):
    a = build_tiny_base(tmp_path / "a", seed=0)
    b = build_tiny_base(tmp_path / "b", seed=1)
    assert a.content_hash == tiny_base.content_hash == content_hash(tiny_base.path)
    assert a.base_id == "avatarforge/tiny-sd21@seed0"
    assert b.content_hash != a.content_hash
    files = sorted(p.relative_to(a.path) for p in a.path.rglob("*.safetensors"))
    assert len(files) == 3  # unet, vae, text encoder
    for rel in files:
        assert (a.path / rel).read_bytes() == (tiny_base.path / rel).read_bytes()


def test_loads_with_stock_diffusers_and_has_sd21_shape(tiny_base):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base.path)
    assert pipe.unet.config.use_linear_projection is True
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 8  # 512 px -> 64 latent, as SD 2.1-base
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.pad_token == "!"
    # the real CLIP vocabulary: "a photo of" has the ids it has in SD 2.1's tokenizer
    assert pipe.tokenizer("a photo of").input_ids == [49406, 320, 1125, 539, 49407]


def test_two_step_generation_has_requested_shape(tiny_base):
    from avatarforge.base.pipeline import load_pipeline

    pipe = load_pipeline(tiny_base, device="cpu")
    args = GenArgs(steps=2, height=64, width=96, num_images=2, seed=3)
    images = generate_images(pipe, "a photo of person", None, args)
    assert [im.size for im in images] == [(96, 64), (96, 64)]
    again = generate_images(pipe, "a photo of person", None, args)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))  # seeded
    other = generate_images(pipe, "a photo of person", None, GenArgs(steps=2, height=64, width=96))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))


def test_hash_is_cached_and_refreshed_when_weights_change(tmp_path, tiny_base):
    base = build_tiny_base(tmp_path / "b", seed=0)
    recorded = json.loads((base.path / INFO_FILE).read_text())
    assert recorded["content_hash"] == base.content_hash
    weights = base.path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert read_base_info(base.path).content_hash != base.content_hash


def test_other_base_is_refused_with_clear_message(tiny_base, tmp_path):
    other = build_tiny_base(tmp_path / "other", seed=5)
    meta = {"base_id": tiny_base.base_id, "base_hash": tiny_base.content_hash}
    check_same_base(meta, tiny_base)
    with pytest.raises(BaseError, match="trained on base .*tiny-sd21@seed0"):
        check_same_base(meta, other)


def test_nothing_downloads_unless_asked():
    with pytest.raises(BaseError, match="allow_download"):
        resolve_base(BaseConfig(base="stabilityai/stable-diffusion-2-1-base"))


def test_not_a_model_folder(tmp_path):
    with pytest.raises(BaseError, match="no model_index.json"):
        read_base_info(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"steps": 0}', r"gen_args\.steps: must be >= 1"),
        ('{"height": 100}', r"gen_args\.height: must be a multiple of 8"),
        ('{"width": 4096}', r"gen_args\.width: must be <= 1024"),
        ('{"scheduler": "magic"}', r"gen_args\.scheduler: must be one of"),
        ('{"seed": "7"}', r"gen_args\.seed: must be a number"),
        ('{"nope": 1}', r"unknown field\(s\) nope"),
        ("[1, 2]", "must be a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_config_errors_name_the_field(text, message):
    with pytest.raises(ConfigError, match=message):
        GenArgs.parse(text)


def test_config_round_trips_through_json(tmp_path):
    args = GenArgs(steps=4, seed=9, scheduler="euler")
    assert GenArgs.load(args.save(tmp_path / "g.json")) == args
    assert GenArgs.parse(None) == GenArgs.parse("") == GenArgs()
    assert torch.Generator().manual_seed(0).initial_seed() == 0
