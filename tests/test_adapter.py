"""The adapter format: files, keys, size per rank, stock diffusers loading, base check, unload."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from fixtures.train import FIXTURE_TRAIN
from safetensors import safe_open

from avatarforge.adapter import (
    METADATA_FILE,
    WEIGHTS_FILE,
    AdapterError,
    AdapterMetadata,
    base_config_for,
    load_adapter,
    read_adapter,
    unload_adapter,
)
from avatarforge.base.config import BaseConfig
from avatarforge.base.identity import BaseError, BaseInfo
from avatarforge.base.pipeline import load_pipeline
from avatarforge.train.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, count_lora_params

PROMPT = "a photo of <<TOK>> person"


def _latents(pipe) -> np.ndarray:
    """Final latents of a 2-step, 64 px generation: finer than 8-bit images."""
    g = torch.Generator("cpu").manual_seed(0)
    out = pipe(
        PROMPT, num_inference_steps=2, height=64, width=64, generator=g, output_type="latent"
    )
    return out.images.numpy()


def test_files_keys_and_size_match_the_ranks(trained_adapter, tiny_base):
    assert (trained_adapter / WEIGHTS_FILE).is_file() and (
        trained_adapter / METADATA_FILE
    ).is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base.path)
    r_u, r_t = FIXTURE_TRAIN["unet_rank"], FIXTURE_TRAIN["text_encoder_rank"]
    expected = count_lora_params(pipe.unet, UNET_TARGETS, r_u) + count_lora_params(
        pipe.text_encoder, TEXT_ENCODER_TARGETS, r_t
    )
    with safe_open(trained_adapter / WEIGHTS_FILE, "pt") as f:
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
        header = f.metadata()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder"}
    assert any(".to_out.0." in k for k in keys) and any(".out_proj." in k for k in keys)
    assert sum(t.numel() for t in tensors.values()) == expected
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    # every down/A matrix has the rank as one dimension
    assert all(r_u in t.shape or r_t in t.shape for t in tensors.values())
    size = (trained_adapter / WEIGHTS_FILE).stat().st_size
    assert 2 * expected < size < 2 * expected + 64 * 1024  # fp16 + header
    lora_meta = json.loads(header["lora_adapter_metadata"])  # diffusers reads alpha from here
    assert (
        lora_meta["unet.r"] == r_u and lora_meta["unet.lora_alpha"] == FIXTURE_TRAIN["unet_alpha"]
    )
    assert lora_meta["text_encoder.r"] == r_t


def test_metadata_records_base_token_and_training(trained_adapter, tiny_base, train_dataset):
    from avatarforge.train.data import read_dataset

    meta = read_adapter(trained_adapter)
    assert meta.base_id == tiny_base.base_id and meta.base_hash == tiny_base.content_hash
    assert (meta.unet_rank, meta.unet_alpha) == (4, 2.0)
    assert (meta.text_encoder_rank, meta.text_encoder_alpha) == (4, 4.0)
    assert meta.token == "<<TOK>>" and meta.instance_prompt == PROMPT
    assert meta.class_prompt == "a photo of person"
    assert meta.steps == FIXTURE_TRAIN["steps"] and meta.seed == 0
    assert meta.dataset_hash == read_dataset(train_dataset).dataset_hash
    assert meta.trainer_version.startswith("avatarforge ")
    assert AdapterMetadata.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    assert base_config_for(meta) == BaseConfig(base="tiny", seed=0)
    saved = json.loads((trained_adapter / "train_config.json").read_text())
    assert saved["seed"] == 0 and saved["steps"] == FIXTURE_TRAIN["steps"]


def test_stock_diffusers_loads_it_changes_output_and_unload_restores(trained_adapter, tiny_base):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base.path)
    pipe.set_progress_bar_config(disable=True)
    before = _latents(pipe)
    pipe.load_lora_weights(trained_adapter)  # stock call: default weight name, no options
    scales = {m.scaling["default_0"] for m in pipe.unet.modules() if hasattr(m, "scaling")}
    assert scales == {0.5}  # alpha 2 / rank 4: alpha survived the round trip
    assert pipe.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"]}
    adapted = _latents(pipe)
    assert np.abs(adapted - before).max() > 1e-3
    pipe.unload_lora_weights()
    assert np.array_equal(_latents(pipe), before)


@pytest.mark.slow
def test_load_and_unload_adapter_restore_the_base_exactly(trained_adapter, tiny_base):
    pipe = load_pipeline(tiny_base, device="cpu")
    before = _latents(pipe)
    meta = load_adapter(pipe, trained_adapter, tiny_base, "alice")
    assert meta.base_hash == tiny_base.content_hash
    adapted = _latents(pipe)
    assert not np.array_equal(adapted, before)
    with pytest.raises(AdapterError, match="already loaded"):
        load_adapter(pipe, trained_adapter, tiny_base, "alice")
    load_adapter(pipe, trained_adapter, tiny_base, "bob")
    unload_adapter(pipe, "bob")  # another adapter stays: only "bob" goes
    pipe.set_adapters("alice")
    assert np.array_equal(_latents(pipe), adapted)
    unload_adapter(pipe, "alice")
    assert np.array_equal(_latents(pipe), before)
    assert not any(hasattr(m, "lora_A") for m in pipe.unet.modules())
    with pytest.raises(AdapterError, match="no adapter named 'alice'"):
        unload_adapter(pipe, "alice")


def test_other_base_is_refused_before_loading(trained_adapter, tiny_base):
    pipe = load_pipeline(tiny_base, device="cpu")
    other = BaseInfo("someone/sd21-768-v", "f" * 64, tiny_base.path)
    with pytest.raises(BaseError, match="only works on the base it was trained on"):
        load_adapter(pipe, trained_adapter, other, "alice")
    assert pipe.get_list_adapters() == {}


def test_missing_or_corrupt_adapters_are_clear_errors(trained_adapter, tmp_path):
    import shutil

    with pytest.raises(AdapterError, match="no such directory"):
        read_adapter(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(trained_adapter, broken)
    (broken / WEIGHTS_FILE).write_bytes((trained_adapter / WEIGHTS_FILE).read_bytes()[:-10])
    with pytest.raises(AdapterError, match="truncated or altered"):
        read_adapter(broken)
    (broken / METADATA_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter(broken)
    (broken / METADATA_FILE).write_text(json.dumps({"base_id": "x"}))
    with pytest.raises(AdapterError, match="lacks field"):
        read_adapter(broken)
    (broken / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterError, match=f"{WEIGHTS_FILE} is missing"):
        read_adapter(broken)
