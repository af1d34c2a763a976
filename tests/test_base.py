"""The embedded tiny base: deterministic, loads with stock diffusers, generates."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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
from avatarforge.base.importer import ImportRefused, import_base
from avatarforge.base.pipeline import load_pipeline
from avatarforge.base.tiny import build_tiny_base
from avatarforge.generate import GenArgs, generate_images
from avatarforge.paths import build_dir
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
    pipe = load_pipeline(tiny_base, device="cpu")
    args = GenArgs(steps=2, height=64, width=96, num_images=2, seed=3)
    images = generate_images(pipe, "a photo of person", None, args)
    assert [im.size for im in images] == [(96, 64), (96, 64)]
    again = generate_images(pipe, "a photo of person", None, args)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))  # seeded
    other = generate_images(pipe, "a photo of person", None, GenArgs(steps=2, height=64, width=96))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))


def test_generation_reports_each_denoising_step(tiny_base):
    pipe = load_pipeline(tiny_base, device="cpu")
    heard = []
    args = GenArgs(steps=3, height=64, width=64)
    generate_images(pipe, "a photo of person", None, args, on_step=lambda *a: heard.append(a))
    assert heard == [(1, 3), (2, 3), (3, 3)]  # a progress bar for a wait of minutes on a CPU


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


# --- avatarforge base import: a real base, checked, as the fp16 folder every step loads ------


def save_as_hub_download(
    folder: Path, cache: Path, repo_id: str, *, fp16_variant: bool = True, plain: bool = True
) -> Path:
    """``folder`` laid out as huggingface_hub stores a download in its cache (HF_HUB_CACHE):
    ``models--org--name/blobs/<hash>`` (sha256 of a weights file, git's blob sha1 of a small
    one), ``snapshots/<revision>/...`` relative links to them, ``refs/main``. Weights are kept
    as they are (``plain``) and/or as fp16 ``*.fp16.safetensors`` variants (``fp16_variant``:
    a file already fp16 is linked, not converted). Returns the snapshot folder."""
    from safetensors.torch import load_file, save_file

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)

    def add(rel: str, source: Path) -> None:
        if source.suffix == ".safetensors":
            h = hashlib.sha256(source.read_bytes()).hexdigest()
        else:
            data = source.read_bytes()
            h = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / h
        if not blob.exists():
            os.link(source, blob)  # same bytes, no copy (a full-size base is GBs)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))

    for source in sorted(folder.rglob("*")):
        rel = source.relative_to(folder).as_posix()
        if not source.is_file() or source.name == INFO_FILE:
            continue
        if source.suffix != ".safetensors":
            add(rel, source)
            continue
        if plain:
            add(rel, source)
        if fp16_variant:
            variant = rel.removesuffix(".safetensors") + ".fp16.safetensors"
            tensors = load_file(source)
            if all(t.dtype == torch.float16 for t in tensors.values() if t.is_floating_point()):
                add(variant, source)
            else:
                half = cache / ".fp16" / repo_id / variant
                half.parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.half() if v.is_floating_point() else v for k, v in
                           tensors.items()}, str(half), metadata={"format": "pt"})  # fmt: skip
                add(variant, half)
    return snapshot


def _dtypes(folder: Path) -> set[str]:
    from safetensors import safe_open

    found = set()
    for weights in folder.rglob("*.safetensors"):
        with safe_open(str(weights), "pt") as f:
            found |= {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    return found


def _avatarforge(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "avatarforge", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


def test_import_a_hub_download_writes_the_fp16_folder_every_step_loads(tiny_base, tmp_path):
    cache = tmp_path / "hub"
    save_as_hub_download(tiny_base.path, cache, "someone/tiny-sd21")  # fp32 files + fp16 variants
    out = tmp_path / "imported"
    # the real command, resolving the hub id in the local cache only (no network here)
    done = _avatarforge("base", "import", "someone/tiny-sd21", "--out", str(out),
                        env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    info = read_base_info(out)
    assert info.base_id == "someone/tiny-sd21" and info.content_hash in done.stdout
    assert "512 px, epsilon" in done.stdout
    assert _dtypes(out) == {"F16"}  # the fp16 variants were taken
    assert not [p for p in out.rglob("*") if p.is_symlink()]  # deploy refuses links
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert names == [  # the names loaders look for, not the variant's
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    recorded = json.loads((out / INFO_FILE).read_text())
    assert (recorded["resolution"], recorded["prediction_type"]) == (512, "epsilon")

    # the same weights without the variant files: converted from fp32, the same hash is
    # expected of them (--expect-hash) and they load and generate as any base
    plain = save_as_hub_download(tiny_base.path, tmp_path / "hub2", "x/y", fp16_variant=False)
    again, _ = import_base(plain, tmp_path / "again", base_id="someone/tiny-sd21",
                           expect_hash=info.content_hash[:12])  # fmt: skip
    assert again.content_hash == info.content_hash
    pipe = load_pipeline(again, device="cpu")
    assert pipe.unet.dtype == torch.float32  # loaders cast to what they run in
    args = GenArgs(steps=1, height=64, width=64)
    (image,) = generate_images(pipe, "a photo of person", None, args)
    assert image.size == (64, 64)

    with pytest.raises(BaseError, match="already holds base someone/tiny-sd21"):
        import_base(plain, tmp_path / "again")


def test_a_hub_id_not_in_the_local_cache_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # what HF_HUB_CACHE sets
    with pytest.raises(BaseError, match=r"not in the local hub cache .*hf download nobody/nothing"):
        import_base("nobody/nothing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _edited_copy(base: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``base`` with one JSON file edited: ``edit`` = (relative path, changes)."""
    copy = tmp_path / "edited"
    shutil.copytree(base, copy, ignore=shutil.ignore_patterns(INFO_FILE))
    rel, changes = edit
    data = json.loads((copy / rel).read_text())
    data.update(changes)
    (copy / rel).write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("unet/config.json", {"use_linear_projection": False}), "use_linear_projection is False"),
        (("unet/config.json", {"cross_attention_dim": 768}), "cross_attention_dim is 768"),
        (("text_encoder/config.json", {"hidden_act": "quick_gelu"}), "hidden_act is 'quick_gelu'"),
        (("model_index.json", {"_class_name": "StableDiffusionXLPipeline"}), "not Stable"),
        # a config the weights were not made with: a shape disagrees
        (("unet/config.json", {"block_out_channels": [32, 96]}), "of another shape"),
        (("unet/config.json", {"layers_per_block": 1}), "unexpected"),
    ],
    ids=["sd1-projection", "cross-attention", "sd1-text-encoder", "sdxl", "shapes", "layers"],
)
def test_import_refuses_another_architecture(tiny_base, tmp_path, edit, message):
    source = _edited_copy(tiny_base.path, tmp_path, edit)
    with pytest.raises(ImportRefused, match=message):
        import_base(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # 512 px (sample_size 64, as 2.1-base) is epsilon; 768 px (96, as 2.1) is v_prediction
        (("scheduler/scheduler_config.json", {"prediction_type": "v_prediction"}),
         "prediction_type 'v_prediction' at 512 px; SD 2.x at 512 px predicts 'epsilon'"),
        (("unet/config.json", {"sample_size": 96}),
         "prediction_type 'epsilon' at 768 px; SD 2.x at 768 px predicts 'v_prediction'"),
        (("unet/config.json", {"sample_size": 80}), "declares 640 px"),
    ],
    ids=["512-v", "768-epsilon", "640"],
)  # fmt: skip
def test_import_refuses_a_prediction_the_size_does_not_have(tiny_base, tmp_path, edit, message):
    source = _edited_copy(tiny_base.path, tmp_path, edit)
    with pytest.raises(ImportRefused, match=re.escape(message)):
        import_base(source, tmp_path / "out")


def test_import_refuses_a_damaged_download_and_an_unexpected_hash(tiny_base, tmp_path):
    snapshot = save_as_hub_download(tiny_base.path, tmp_path / "hub", "a/b", plain=False)
    blob = (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").resolve()
    good = blob.read_bytes()
    blob.unlink()  # a new file, not the tiny base's own (the blob was a hard link to it)
    blob.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit flipped in transit
    with pytest.raises(ImportRefused, match=r"unet/diffusion_pytorch_model.fp16.safetensors: hash"):
        import_base(snapshot, tmp_path / "out")
    blob.unlink()  # and one that never finished downloading
    with pytest.raises(ImportRefused, match="missing from the hub cache"):
        import_base(snapshot, tmp_path / "out")
    blob.write_bytes(good)
    with pytest.raises(ImportRefused, match="is not the expected 0000000000000000"):
        import_base(snapshot, tmp_path / "out", expect_hash="0" * 64)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".import-*"))
    info, _ = import_base(snapshot, tmp_path / "out")  # the download repaired: imported
    assert info.base_id == "a/b"


def test_import_refuses_pickled_weights(tiny_base, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_base.path, source)
    weights = source / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ImportRefused, match=r"vae: only \.bin weights \(a pickle"):
        import_base(source, tmp_path / "out")


@pytest.mark.slow
def test_import_the_full_size_base_saved_as_a_hub_download(tmp_path):
    """The full-size SD 2.1-base architecture (random weights; built once into the build cache,
    ~1 min and 2.6 GB) as `hf download --include '*.fp16.safetensors'` leaves it, imported
    through the command: SD 2.1's size, fp16, byte for byte the downloaded weights."""
    from avatarforge.fullsize import PARAM_COUNTS, build_full_base

    full = build_full_base(device="cpu")
    cache = build_dir() / "test-hub"  # hard links into the built base: no second copy
    shutil.rmtree(cache, ignore_errors=True)
    save_as_hub_download(full.path, cache, "stabilityai/stable-diffusion-2-1-base", plain=False)
    out = tmp_path / "sd21"
    try:
        done = _avatarforge(
            "base", "import", "stabilityai/stable-diffusion-2-1-base", "--out", str(out),
            "--expect-hash", full.content_hash,  # fp16 files are copied as they are
            env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "(SD 2.1's size)" in done.stdout and "512 px, epsilon" in done.stdout
        info = read_base_info(out)
        assert info.content_hash == full.content_hash
        assert info.base_id == "stabilityai/stable-diffusion-2-1-base"
        assert _dtypes(out) == {"F16"}
        from avatarforge.base.importer import check_source

        assert check_source(out).params == PARAM_COUNTS
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
