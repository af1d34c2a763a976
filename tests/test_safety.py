"""The shared base's optional image safety check (serving.safety_checker): a classifier in
diffusers' StableDiffusionSafetyChecker format, built from config with random weights as the
tiny base is, whose thresholds decide what it flags (avatarforge.testing.safety)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from avatarforge.base.pipeline import load_pipeline
from avatarforge.generate import from_jpeg_base64
from avatarforge.safe_tar import write_reproducible_tar
from avatarforge.serving import bootstrap
from avatarforge.serving.config import ModelParams, ServingConfig, local_instance_env
from avatarforge.serving.handler import encode_rows
from avatarforge.serving.safety import SafetyCheck
from avatarforge.serving.shared_base import SharedBase
from avatarforge.settings import ConfigError
from avatarforge.testing.safety import build_tiny_safety_checker

SMALL = {"steps": 2, "height": 64, "width": 64}


def _noise(n: int, size=(80, 64)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)) for _ in range(n)
    ]


def _request(prompt: str, **gen_args) -> dict:
    column = lambda v: np.array([[v.encode()]], dtype=object)  # noqa: E731
    return {"prompt": column(prompt), "gen_args": column(json.dumps({**SMALL, **gen_args}))}


@pytest.fixture(scope="module")
def checkers(tmp_path_factory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("safety")
    return {
        "everything": build_tiny_safety_checker(out / "all", flag_everything=True),
        "nothing": build_tiny_safety_checker(out / "none", flag_everything=False, layout="flat"),
    }


def test_flagged_images_are_replaced_by_black_ones_of_their_size_and_counted(checkers):
    images = _noise(3)
    results = [
        encode_rows([images[:2]]),
        ValueError("a refused request"),
        encode_rows([images[2:]]),
    ]
    sent = [r.copy() if isinstance(r, np.ndarray) else r for r in results]
    assert SafetyCheck.load(checkers["everything"]).screen(results) == [2, 0, 1]
    for result in (results[0], results[2]):
        for item in result.flat:
            image = from_jpeg_base64(item)
            assert image.size == (80, 64) and np.asarray(image).max() <= 8  # black (JPEG)
    assert isinstance(results[1], ValueError)
    # a checker that flags nothing leaves every byte as it was
    assert SafetyCheck.load(checkers["nothing"]).screen(sent) == [0, 0, 0]
    assert [list(r.flat) for r in (sent[0], sent[2])] == [
        list(encode_rows([images[:2]]).flat), list(encode_rows([images[2:]]).flat)
    ]  # fmt: skip


def test_a_folder_that_is_not_a_checker_is_refused_naming_the_setting(tmp_path, checkers):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"serving.safety_checker: .* is not a StableDiffusion"):
        SafetyCheck.load(tmp_path)
    assert ServingConfig().safety_checker == ""  # off unless an operator names one
    env = ServingConfig(safety_checker=str(checkers["nothing"])).to_env()
    assert ServingConfig.from_env(env).safety_checker == str(checkers["nothing"])


def test_the_shared_base_never_returns_a_flagged_image_and_counts_it_per_user(tiny_base, checkers):
    pipe = load_pipeline(tiny_base, device="cpu")
    lines: list[str] = []
    counters = bootstrap.RequestCounters(log_every_s=0.001, emit=lines.append)
    flagging = SharedBase(pipe, tiny_base, counters=counters,
                          safety=SafetyCheck.load(checkers["everything"]))  # fmt: skip
    unchecked = SharedBase(pipe, tiny_base)
    request = _request("a photo of a person", seed=3, num_images=2)
    (flagged,) = flagging.handle([request])
    (plain,) = unchecked.handle([request])
    images = [from_jpeg_base64(item) for item in flagged.flat]
    assert [im.size for im in images] == [(64, 64)] * 2
    assert all(np.asarray(im).max() <= 8 for im in images)
    assert any(np.asarray(from_jpeg_base64(item)).max() > 64 for item in plain.flat)
    # batched or one at a time, the answer is screened
    flagging.batching = False
    (one,) = flagging.handle([request])
    assert all(np.asarray(from_jpeg_base64(item)).max() <= 8 for item in one.flat)
    counters.flush()
    counts = [json.loads(line) for line in lines]
    assert sum(c[bootstrap.FLAGGED] for c in counts) == 4  # images
    assert sum(c["served"] for c in counts) == 2  # requests


def test_the_setting_brings_a_checker_tarball_into_the_shared_dir_once(
    tiny_base, checkers, tmp_path
):
    archive = tmp_path / "checker.tar.gz"  # one folder inside, as deploy mme uploads it
    write_reproducible_tar(checkers["everything"], archive, "safety-checker")
    env = local_instance_env(tiny_base.path, tmp_path / "shared",
                             serving=ServingConfig(safety_checker=str(archive)))  # fmt: skip
    params = ModelParams(tiny_base.base_id, tiny_base.content_hash)
    shared = SharedBase.from_params(params, "CPU", environ=env)
    assert shared.safety is not None
    (copy,) = (tmp_path / "shared" / "safety").iterdir()
    assert (copy / "safety_checker" / "config.json").is_file()
    again = SharedBase.from_params(params, "CPU", environ=env)
    assert again.safety is not None and [*(tmp_path / "shared" / "safety").iterdir()] == [copy]
    assert shared.safety.flags(_noise(1)) == [True]  # the checker in the tarball
