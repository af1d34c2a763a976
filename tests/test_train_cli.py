"""`avatarforge train` and `avatarforge generate-local`: options from TrainConfig, presets, the
CPU estimate, clear errors; SIGTERM and hash seeds in real subprocesses."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from avatarforge.adapter import load_adapter, read_adapter
from avatarforge.base.pipeline import load_pipeline
from avatarforge.cli import app
from avatarforge.cli.train import cpu_notice
from avatarforge.generate import GenArgs, generate_images
from avatarforge.train.config import PRESETS, TrainConfig, preset_config
from avatarforge.train.estimate import Estimate

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


def test_a_cpu_run_says_its_estimate_and_explicit_options_override_the_preset(
    train_dataset, tmp_path
):
    args = ["train", str(train_dataset), "--user", "q", "--out", str(tmp_path), *TINY_RUN]
    result = runner.invoke(app, [*args, "--preset", "cpu-quick", "--seed", "5"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "trains on the CPU" in said and "estimate at 64 px" in said
    assert re.search(r"training 2 steps x [\d.]+ s = \d+ s", said)
    assert "Ctrl-C or SIGTERM saves one" in said and "(estimated" in said
    saved = json.loads((tmp_path / "adapter" / "train_config.json").read_text())
    assert (saved["resolution"], saved["steps"], saved["seed"]) == (64, 2, 5)  # given: they win
    quick = PRESETS["cpu-quick"]
    for key in ("learning_rate", "gradient_checkpointing", "checkpoint_every"):
        assert saved[key] == quick[key] != getattr(TrainConfig(), key)  # from the preset

    result = runner.invoke(app, [*args, "--preset", "gpu-fast"])
    assert result.exit_code == 1 and "--preset: unknown preset 'gpu-fast'" in result.output


def test_the_cpu_notice_names_the_quick_preset_and_its_estimate():
    def estimate(resolution, class_images, steps, step_s) -> Estimate:
        return Estimate("cpu", resolution, class_images, 25, 0.5, 1.0, 10.0, 89, 0.5, steps,
                        step_s, 30.0)  # fmt: skip

    long = estimate(512, 50, 800, 18.0)
    quick = estimate(128, 8, 60, 1.0)
    text = " ".join(cpu_notice(long, TrainConfig(), preset_config("cpu-quick"), quick).split())
    assert "class images 50 to make x 25 steps x 0.500 s = 11.4 min" in text
    assert "training 800 steps x 18.00 s = 4.0 h" in text and "in all about 4.2 h" in text
    assert "--preset cpu-quick (128 px, 60 steps, 8 class images: about 3.9 min here)" in text
    assert "every 100 steps and every 5 min" in text
    assert "--preset" not in cpu_notice(long, TrainConfig())  # already quick, or a short run


# ---------------------------------------------------------------- real processes

SUB_RUN = ["--resolution", "64", "--steps", "40", "--num-class-images", "2",
           "--class-image-steps", "2", "--device", "cpu", "--seed", "11"]  # fmt: skip


def _train(dataset: Path, out: Path, hash_seed: int, *extra: str) -> subprocess.Popen:
    """`python -m avatarforge train` in its own process, with its own hash seed."""
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    command = [sys.executable, "-m", "avatarforge", "train", str(dataset), "--user", "p",
               "--out", str(out), *SUB_RUN, *extra]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode() + err.decode()


def _files(adapter: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(adapter.iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(train_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    code, output = _finish(_train(train_dataset, out, 1, "--no-progress"))
    assert code == 0, output
    return out / "adapter"


@pytest.mark.slow
def test_processes_with_other_hash_seeds_write_the_same_adapter_files(
    uninterrupted, train_dataset, tmp_path
):
    code, output = _finish(_train(train_dataset, tmp_path, 2, "--no-progress"))
    assert code == 0, output
    assert _files(tmp_path / "adapter") == _files(uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_same_adapter(
    uninterrupted, train_dataset, tmp_path
):
    proc = _train(train_dataset, tmp_path, 3, "--progress")
    seen, deadline = b"", time.monotonic() + 120
    try:  # the progress bar (stderr) shows a finished step: only then is there one to save
        while not re.search(rb"train: .*\| *[1-9]\d*/40", seen):
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode()[-2000:]
            if select.select([proc.stderr], [], [], 1.0)[0]:
                seen += os.read(proc.stderr.fileno(), 65536)
        proc.send_signal(signal.SIGTERM)
        code, output = _finish(proc)
    finally:
        proc.kill()
    assert code == 3, output
    said = " ".join(output.split())
    stopped = re.search(r"stopped by SIGTERM after step (\d+) of 40", said)
    assert stopped and "run the same command again to resume" in said, said[-2000:]
    step = int(stopped.group(1))
    assert (tmp_path / "checkpoints" / f"step-{step:07d}").is_dir()
    assert not (tmp_path / "adapter").exists()

    code, output = _finish(_train(train_dataset, tmp_path, 4, "--resume", "--no-progress"))
    assert code == 0, output
    assert f"resuming from the checkpoint of step {step}" in " ".join(output.split())
    assert _files(tmp_path / "adapter") == _files(uninterrupted)  # as if never stopped


@pytest.mark.slow
def test_a_full_disk_is_a_clear_failure_and_no_earlier_adapter_looks_like_the_result(
    uninterrupted, train_dataset, tmp_path
):
    # files over 40 KB cannot be written (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC);
    # the adapter (69 KB) is the first such file: the run must fail clearly, and the adapter
    # an earlier run left in the same folder must not stay where packaging takes it from
    (tmp_path / "adapter").mkdir()
    for name, data in _files(uninterrupted).items():
        (tmp_path / "adapter" / name).write_bytes(data)
    limit = (
        "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000)); "
        "sys.argv[0] = 'avatarforge'; runpy.run_module('avatarforge', run_name='__main__')"
    )
    options = [*SUB_RUN, "--steps", "2", "--no-progress", "--checkpoint-minutes", "0"]
    command = [sys.executable, "-c", limit, "train", str(train_dataset), "--user", "p",
               "--out", str(tmp_path), *options]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, said[-2000:]
    assert "could not write the adapter" in said and "File too large" in said, said[-2000:]
    assert "Traceback" not in said
    assert not (tmp_path / "adapter").exists()  # nothing for `package` to ship by mistake
    assert _files(tmp_path / "adapter.previous") == _files(uninterrupted)  # and nothing lost
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-write
