"""The trainer on the tiny base: learning, reproducibility, resume, failures, class-image cache,
presets, time-based checkpoints, the learning-rate schedule and the run-time estimate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures.train import FIXTURE_TRAIN
from PIL import Image

from avatarforge.adapter import WEIGHTS_FILE, read_adapter
from avatarforge.settings import ConfigError
from avatarforge.testing.datasets import write_dataset
from avatarforge.train import TrainConfig, TrainingError, TrainingStopped, train
from avatarforge.train import class_images as class_images_module
from avatarforge.train import loop as loop_module
from avatarforge.train.class_images import class_images
from avatarforge.train.config import PRESETS, preset_config
from avatarforge.train.estimate import estimate_run
from avatarforge.train.optim import make_lr_scheduler


def _config(**changes) -> TrainConfig:
    return TrainConfig(**{**FIXTURE_TRAIN, "steps": 4, **changes})


def test_loss_falls_against_the_untrained_model_on_the_same_batches(
    train_dataset, tiny_base, tmp_path
):
    # Diffusion losses swing with the random timestep of each step, so a single curve of a short
    # run is noise. Noise, timesteps and data order are a function of (seed, step): a run with
    # learning rate 0 sees the very same batches, and the difference is what training did.
    cfg = {"steps": 30, "learning_rate": 3e-2, "max_grad_norm": 0.0}
    trained = np.array(train(train_dataset, tmp_path / "a", _config(**cfg), tiny_base).losses)
    frozen = cfg | {"learning_rate": 0.0}
    untrained = np.array(train(train_dataset, tmp_path / "b", _config(**frozen), tiny_base).losses)
    assert trained[0] == untrained[0]  # LoRA starts as the identity (B = 0)
    gain = untrained - trained
    assert gain[-10:].mean() > 0.02 and (gain[-10:] > 0).sum() >= 8
    assert gain[-10:].mean() > gain[:10].mean()  # and the gap widens


def test_same_seed_same_adapter_bytes_other_seed_other_bytes(train_dataset, tiny_base, tmp_path):
    a = train(train_dataset, tmp_path / "a", _config(), tiny_base).adapter_dir
    b = train(train_dataset, tmp_path / "b", _config(), tiny_base).adapter_dir
    c = train(train_dataset, tmp_path / "c", _config(seed=1), tiny_base).adapter_dir
    assert (a / WEIGHTS_FILE).read_bytes() == (b / WEIGHTS_FILE).read_bytes()
    assert (a / WEIGHTS_FILE).read_bytes() != (c / WEIGHTS_FILE).read_bytes()
    saved = json.loads((c / "train_config.json").read_text())
    assert TrainConfig.from_dict(saved) == _config(seed=1)


def test_resume_after_a_crash_continues_and_matches_an_uninterrupted_run(
    train_dataset, tiny_base, tmp_path
):
    cfg = _config(steps=6, checkpoint_every=2)
    whole = train(train_dataset, tmp_path / "whole", cfg, tiny_base)

    def crash(info):
        if info.step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(train_dataset, tmp_path / "crashed", cfg, tiny_base, on_step=crash)
    assert not (tmp_path / "crashed" / "adapter").exists()
    assert [p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir()] == ["step-0000004"]

    resumed = train(train_dataset, tmp_path / "crashed", cfg, tiny_base)
    assert resumed.resumed_from == 4 and resumed.steps == 6
    assert resumed.losses == whole.losses
    assert (resumed.adapter_dir / WEIGHTS_FILE).read_bytes() == (
        whole.adapter_dir / WEIGHTS_FILE
    ).read_bytes()
    assert not (tmp_path / "crashed" / "checkpoints").exists()  # the adapter supersedes them


def test_time_boxed_runs_stop_as_errors_and_resume(train_dataset, tiny_base, tmp_path):
    cfg = _config(steps=5, max_steps_this_run=3)
    with pytest.raises(TrainingStopped, match="stopped after step 3 of 5") as stopped:
        train(train_dataset, tmp_path, cfg, tiny_base)
    assert stopped.value.checkpoint.name == "step-0000003"
    assert not (tmp_path / "adapter").exists()  # no half-trained adapter looks finished
    result = train(train_dataset, tmp_path, cfg, tiny_base)
    assert result.resumed_from == 3 and len(result.losses) == 5
    assert read_adapter(result.adapter_dir).steps == 5


def test_resume_refuses_a_checkpoint_made_with_other_settings(train_dataset, tiny_base, tmp_path):
    with pytest.raises(TrainingStopped):
        train(train_dataset, tmp_path, _config(max_steps_this_run=2), tiny_base)
    with pytest.raises(TrainingError, match="other settings .*learning_rate"):
        train(train_dataset, tmp_path, _config(learning_rate=1e-4), tiny_base)
    result = train(train_dataset, tmp_path, _config(learning_rate=1e-4, resume=False), tiny_base)
    assert result.resumed_from == 0


def test_caching_and_checkpointing_do_not_change_the_result(train_dataset, tiny_base, tmp_path):
    plain = train(train_dataset, tmp_path / "a", _config(steps=3), tiny_base).losses
    other = _config(steps=3, cache_latents=False, gradient_checkpointing=True)
    assert np.allclose(train(train_dataset, tmp_path / "b", other, tiny_base).losses, plain, 1e-4)


def test_frozen_text_encoder_makes_a_unet_only_adapter(train_dataset, tiny_base, tmp_path):
    from safetensors import safe_open

    cfg = _config(steps=2, train_text_encoder=False, prior_preservation=False)
    result = train(train_dataset, tmp_path, cfg, tiny_base)
    with safe_open(result.adapter_dir / WEIGHTS_FILE, "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet"}  # noqa: SIM118
    meta = read_adapter(result.adapter_dir)
    assert meta.text_encoder_rank == 0 and meta.prior_preservation is False
    assert result.peak_memory_bytes > 0 and result.seconds > 0


def test_failures_raise_instead_of_looking_like_success(tmp_path, tiny_base, monkeypatch):
    with pytest.raises(TrainingError, match="manifest.json is missing"):
        train(tmp_path, tmp_path / "out", _config(), tiny_base)
    dataset = write_dataset(tmp_path / "ds", count=1)
    manifest = json.loads((dataset / "manifest.json").read_text())
    for item in manifest["items"]:
        item["status"] = "rejected"
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainingError, match="no kept images"):
        train(dataset, tmp_path / "out", _config(), tiny_base)

    good = write_dataset(tmp_path / "good", count=1)
    monkeypatch.setattr(
        loop_module, "micro_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True)
    )
    with pytest.raises(TrainingError, match="loss is nan at step 1"):
        train(good, tmp_path / "nan", _config(), tiny_base)
    assert not (tmp_path / "nan" / "adapter").exists()


def test_config_is_checked_where_it_enters():
    with pytest.raises(ConfigError, match="instance_prompt: must contain the token"):
        TrainConfig(instance_prompt="a photo of person")
    with pytest.raises(ConfigError, match="resolution: must be a multiple of 8"):
        TrainConfig(resolution=100)
    with pytest.raises(ConfigError, match="unet_rank: must be >= 1"):
        TrainConfig(unet_rank=0)
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")


def test_class_images_are_cached_and_only_missing_ones_are_made(tiny_base, tmp_path, monkeypatch):
    made = []
    real = class_images_module._generate
    monkeypatch.setattr(
        class_images_module,
        "_generate",
        lambda *a, **kw: (made.append(list(a[-2])), real(*a, **kw)),
    )
    kw = {"steps": 1, "cache_root": tmp_path, "device": "cpu"}
    two = class_images(tiny_base, "a photo of person", 2, 64, **kw)
    assert made == [[0, 1]] and all(p.is_file() for p in two)
    assert class_images(tiny_base, "a photo of person", 2, 64, **kw) == two
    three = class_images(tiny_base, "a photo of person", 3, 64, **kw)
    assert made == [[0, 1], [2]] and three[:2] == two  # the second user pays only for one more
    other = class_images(tiny_base, "a photo of woman", 1, 64, **kw)
    assert other[0].parent != two[0].parent


def test_class_images_in_batches_are_the_images_made_one_at_a_time(tiny_base, tmp_path):
    # on a GPU they are made 8 per call; image i keeps seed i whatever the batch
    kw = {"steps": 2, "device": "cpu"}
    alone = class_images(tiny_base, "a photo of person", 3, 64, cache_root=tmp_path / "a", **kw)
    batched = class_images(tiny_base, "a photo of person", 3, 64, cache_root=tmp_path / "b",
                           per_call=2, **kw)  # fmt: skip
    for one, other in zip(alone, batched, strict=True):
        a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (one, other))
        assert np.abs(a - b).max() <= 2  # a larger batch sums in another order
    assert not np.array_equal(*(np.asarray(Image.open(p)) for p in alone[:2]))


def _models_of(unet_params: int):
    """Models whose UNet has ``unet_params`` parameters, on the meta device (no memory)."""
    from avatarforge.train.models import Models

    unet = torch.nn.Linear(unet_params // 1000, 1000, bias=False, device="meta")
    return Models(tokenizer=None, text_encoder=None, vae=None, unet=unet, scheduler=None)


def test_gradient_checkpointing_auto_recomputes_only_when_gpu_memory_is_short():
    from avatarforge.train.models import SD21_UNET_PARAMS, decide_checkpointing

    sd21, gib = _models_of(SD21_UNET_PARAMS), 2**30
    cfg = TrainConfig()  # 512 px, one instance + one prior image per step
    assert cfg.gradient_checkpointing == "auto"
    # an H200 or an A10G after loading the models: plenty free, recomputing only costs time
    on, why = decide_checkpointing(cfg, sd21, "cuda:0", free_bytes=130 * gib)
    assert not on and "auto: off" in why and "130.0 GiB free" in why
    assert not decide_checkpointing(cfg, sd21, "cuda:0", free_bytes=19 * gib)[0]
    # an 8 GB card: short of 1.5x the ~3.4 GiB of activations
    on, why = decide_checkpointing(cfg, sd21, "cuda:0", free_bytes=4 * gib)
    assert on and "auto: on" in why
    # twice the pixels and the rows: ~15 GiB of activations, 20 GiB free is short
    big = TrainConfig(resolution=768, batch_size=2)
    assert decide_checkpointing(big, sd21, "cuda", free_bytes=20 * gib)[0]
    # a smaller UNet needs less: the tiny base never recomputes
    assert not decide_checkpointing(cfg, _models_of(1_400_000), "cuda", free_bytes=gib)[0]
    # never on a CPU; as set when set; true/false as before auto existed
    assert decide_checkpointing(cfg, sd21, "cpu", free_bytes=0) == (
        False, "auto: off on cpu (recomputing only costs time there)",
    )  # fmt: skip
    assert decide_checkpointing(TrainConfig(gradient_checkpointing="on"), sd21, "cpu")[0]
    assert not decide_checkpointing(TrainConfig(gradient_checkpointing="off"), sd21, "cuda")[0]
    assert TrainConfig(gradient_checkpointing=True).gradient_checkpointing == "on"
    assert TrainConfig.from_dict({"gradient_checkpointing": False}).gradient_checkpointing == "off"
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        TrainConfig(gradient_checkpointing="sometimes")


def test_a_run_resumes_where_checkpointing_is_decided_otherwise(train_dataset, tiny_base, tmp_path):
    # auto decides by the machine's free memory: a job resumed on another machine may differ
    with pytest.raises(TrainingStopped):
        train(train_dataset, tmp_path, _config(max_steps_this_run=2, gradient_checkpointing="on"),
              tiny_base)  # fmt: skip
    result = train(train_dataset, tmp_path, _config(gradient_checkpointing="off"), tiny_base)
    assert result.resumed_from == 2
    assert result.log["gradient_checkpointing"] == {
        "on": False,
        "why": "train.gradient_checkpointing=off",
    }


def test_presets_are_valid_configs_and_explicit_values_win():
    quick, defaults = preset_config("cpu-quick"), TrainConfig()
    assert {k: getattr(quick, k) for k in PRESETS["cpu-quick"]} == PRESETS["cpu-quick"]
    assert quick.resolution < defaults.resolution and quick.steps < defaults.steps
    assert quick.num_class_images < defaults.num_class_images
    assert quick.gradient_checkpointing == "off"  # it only costs time on a CPU
    mine = preset_config("cpu-quick", steps=7, seed=3)
    assert (mine.steps, mine.seed, mine.resolution) == (7, 3, quick.resolution)
    with pytest.raises(ConfigError, match=r"train\.preset: unknown preset 'gpu-fast'.*cpu-quick"):
        preset_config("gpu-fast")
    with pytest.raises(ConfigError, match="train.resolution: must be a multiple of 8"):
        preset_config("cpu-quick", resolution=100)


def test_checkpoints_also_come_by_time(train_dataset, tiny_base, tmp_path):
    def saved(minutes: float) -> list[str]:
        names: list[str] = []
        cfg = _config(steps=3, checkpoint_every=1000, checkpoint_minutes=minutes)
        train(train_dataset, tmp_path / f"{minutes}", cfg, tiny_base, on_checkpoint=names.append)
        return [p.name for p in names]

    # every step is "due" after a nanosecond; none after the last (the adapter supersedes them)
    assert saved(1e-9) == ["step-0000001", "step-0000002"]
    assert saved(0.0) == []  # off; and 1000 steps never come


def test_lr_schedule_warms_up_from_the_first_step_and_resumes_from_the_step_alone():
    def lrs(start: int, count: int) -> list[float]:
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([param], lr=0.01)
        schedule = make_lr_scheduler(optimizer, warmup=4, start=start)
        seen = []
        for _ in range(count):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return seen

    assert np.allclose(lrs(0, 6), [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])  # never 0
    assert lrs(2, 4) == lrs(0, 6)[2:]  # a resumed run gets the same rates, from no saved state


def test_estimate_measures_the_run_and_counts_only_what_is_left(train_dataset, tiny_base, tmp_path):
    cfg = _config(steps=4, max_steps_this_run=3)
    with pytest.raises(TrainingStopped):
        train(train_dataset, tmp_path, cfg, tiny_base)
    est = estimate_run(tiny_base, cfg, "cpu", instance_images=5, out_dir=tmp_path)
    assert est.steps == 1 and est.step_s > 0 and est.training_s == est.step_s
    assert est.class_images == 0 and est.class_images_s == 0  # the run made them: cached
    assert est.encode_images == 5 + cfg.num_class_images and est.encode_s > 0
    assert est.total_s == est.setup_s + est.training_s

    # a prompt no run has used: every class image is still to make, and costs its steps
    fresh = _config(steps=2, class_prompt="a photo of an estimated person", cache_latents=False)
    est = estimate_run(tiny_base, fresh, "cpu", instance_images=5)
    assert est.class_images == fresh.num_class_images and est.denoise_s > 0 and est.decode_s > 0
    per_image = fresh.class_image_steps * est.denoise_s + est.decode_s
    assert est.class_images_s == pytest.approx(est.load_s + 2 * per_image)
    assert est.encode_images == 0 and est.steps == 2  # latents not cached: encoded in each step
