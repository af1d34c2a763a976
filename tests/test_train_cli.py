"""`avatarforge train` and `avatarforge generate-local`: options from TrainConfig, clear errors."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from avatarforge.adapter import load_adapter, read_adapter
from avatarforge.base import load_pipeline
from avatarforge.cli import app
from avatarforge.generate import GenArgs, generate_images

runner = CliRunner()
TINY_RUN = ["--resolution", "64", "--steps", "2", "--num-class-images", "2",
            "--class-image-steps", "2", "--no-progress", "--device", "cpu"]  # fmt: skip


def test_train_writes_the_adapter_under_the_users_folder(
    train_dataset, tiny_base, tmp_path, monkeypatch
):
    monkeypatch.setenv("AVATARFORGE_BUILD", str(tmp_path))
    result = runner.invoke(
        app,
        [
            "train",
            str(train_dataset),
            "--user",
            "alice",
            *TINY_RUN,
            "--unet-rank",
            "2",
            "--base",
            str(tiny_base.path),
        ],
    )
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "users" / "alice" / "adapter"
    assert str(adapter) in result.output.replace("\n", "")
    assert read_adapter(adapter).unet_rank == 2
    assert "peak memory" in result.output


def test_train_errors_are_clear_not_tracebacks(train_dataset, tmp_path):
    cases = [
        ([str(tmp_path), "--user", "bob"], "manifest.json is missing"),
        ([str(train_dataset), "--user", "../bob"], "--user"),
        ([str(train_dataset), "--user", "bob", "--resolution", "100"], "multiple of 8"),
        ([str(train_dataset), "--user", "bob", "--mixed-precision", "fp8"], "mixed_precision"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["train", *args, "--out", str(tmp_path / "o")])
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output


def test_time_boxed_train_exits_3_and_says_how_to_resume(train_dataset, tmp_path):
    args = ["train", str(train_dataset), "--user", "c", "--out", str(tmp_path), *TINY_RUN]
    result = runner.invoke(app, [*args, "--max-steps-this-run", "1"])
    assert result.exit_code == 3 and "resume" in result.output
    assert runner.invoke(app, args).exit_code == 0


def test_generate_local_matches_generate_images_bit_for_bit(trained_adapter, tiny_base, tmp_path):
    gen = {"steps": 2, "height": 64, "width": 64, "num_images": 2, "seed": 7}
    result = runner.invoke(
        app,
        ["generate-local", "--adapter", str(trained_adapter), "--prompt", "a <<TOK>> person",
         "--gen-args", json.dumps(gen), "--out", str(tmp_path), "--format", "png"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    paths = result.output.split()
    assert [p.endswith(".png") for p in paths] == [True, True]
    pipe = load_pipeline(tiny_base, device="cpu")
    load_adapter(pipe, trained_adapter, tiny_base, "u")
    expected = generate_images(pipe, "a <<TOK>> person", None, GenArgs(**gen))
    for path, image in zip(paths, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))


def test_generate_local_errors_are_clear(trained_adapter, tmp_path):
    cases = [
        (["--adapter", str(tmp_path), "--prompt", "x"], "missing"),
        (["--adapter", str(trained_adapter), "--prompt", "x", "--gen-args", "{"], "not valid JSON"),
        (["--adapter", str(trained_adapter), "--prompt", "x", "--gen-args", '{"steps": 0}'],
         "gen_args.steps"),
        (["--adapter", str(trained_adapter), "--prompt", " "], "prompt: must not be empty"),
    ]  # fmt: skip
    for args, message in cases:
        result = runner.invoke(app, ["generate-local", *args, "--out", str(tmp_path / "o")])
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output
