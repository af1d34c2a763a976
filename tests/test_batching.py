"""Cross-user batching on the shared base: rows of different users' requests in one UNet batch.

The reference is each row run alone (``SharedBase.generate``: the adapter in its slot, exactly
``generate_images`` with it loaded; tests/test_adapter_slots.py proves that path). A batch sums
in another order than a single row, so its images may differ by float rounding. Tolerance:
at most 2 (of 255) per pixel and 0.05 on average, on the images before JPEG encoding. Measured
on the tiny base (64-72 px, ddim/euler_a/dpmpp/pndm, 1-2 images per row, CFG on and off,
adapters of ranks 2-8 and none in one batch): max 1, and most rows identical.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures.images import pixel_diff, pixels

from avatarforge.adapter import AdapterError
from avatarforge.base.pipeline import load_pipeline
from avatarforge.fullsize import random_adapter
from avatarforge.generate import GenArgs, batch_key, from_jpeg_base64, generate_images
from avatarforge.serving.config import ServingConfig, flag
from avatarforge.serving.handler import Job, RequestError, Row, handle_batched, plan_batches
from avatarforge.serving.shared_base import SharedBase
from avatarforge.settings import ConfigError

PROMPT = "a photo of <<TOK>> person"
MAX_DIFF, MEAN_DIFF = 2, 0.05  # per pixel, of 255: see the module docstring


@pytest.fixture(scope="module")
def users(trained_adapter, tiny_base, tmp_path_factory) -> list[str]:
    """Four users with distinct adapters (the trained one at rank 4, random ones at 8 and 2)."""
    out = tmp_path_factory.mktemp("batch-users")
    rank_2 = {"unet_rank": 2, "unet_alpha": 2.0, "text_encoder_rank": 2, "text_encoder_alpha": 2.0}
    return [
        str(trained_adapter),
        str(random_adapter(tiny_base, out / "u1", seed=11, weight_std=0.05)),
        str(random_adapter(tiny_base, out / "u2", seed=12, weight_std=0.05)),
        str(random_adapter(tiny_base, out / "u3", seed=13, weight_std=0.05, **rank_2)),
    ]


@pytest.fixture(scope="module")
def shared(tiny_base):
    return SharedBase(load_pipeline(tiny_base, device="cpu"), tiny_base, batch_max_images=8)


def _jobs(users, **args) -> list[Job]:
    """One row per user and one for the bare base; prompts, negatives and seeds differ."""
    jobs = []
    for i, adapter in enumerate([*users, None]):
        prompt = PROMPT if i % 2 else "a portrait"
        row = Row(prompt, "blurry" if i == 1 else None, GenArgs(seed=20 + i, **args))
        jobs.append(Job(i, 0, row, adapter))
    return jobs


@pytest.mark.parametrize(
    "args",
    [
        {"steps": 2, "height": 64, "width": 64},
        {"steps": 2, "height": 64, "width": 64, "num_images": 2, "scheduler": "euler_a"},
        {"steps": 2, "height": 72, "width": 64, "guidance_scale": 1.0, "scheduler": "dpmpp"},
    ],
    ids=["ddim-cfg", "euler_a-2-images", "dpmpp-no-cfg"],
)
def test_batched_rows_equal_separate_runs(shared, users, args):
    jobs = _jobs(users, **args)
    batched = shared.generate_jobs(jobs)  # one pipeline call, one adapter per row
    for job, images in zip(jobs, batched, strict=True):
        (alone,) = shared.generate_jobs([job])
        assert len(images) == len(alone) == job.row.args.num_images
        for a, b in zip(images, alone, strict=True):
            max_diff, mean_diff = pixel_diff(a, b)
            assert max_diff <= MAX_DIFF and mean_diff <= MEAN_DIFF, (job.adapter, max_diff)
    # and the rows really are different images (adapters, prompts, seeds)
    firsts = [pixels(images[0]) for images in batched]
    assert all(np.abs(firsts[0] - other).mean() > 1 for other in firsts[1:])


def _request(prompt, adapter, **gen_args):
    def column(value):
        return np.array([[value.encode()]], dtype=object)

    request = {"prompt": column(prompt), "gen_args": column(json.dumps(gen_args))}
    if adapter is not None:
        request["adapter"] = column(adapter)
    return request


def test_batched_requests_through_the_handler(shared, users, tiny_base, tmp_path):
    small = {"steps": 2, "height": 64, "width": 64}
    broken = tmp_path / "broken"  # an adapter folder with nothing in it
    broken.mkdir()
    requests = [
        _request(PROMPT, users[0], seed=1, **small),
        _request(PROMPT, str(broken), seed=2, **small),
        _request(PROMPT, users[1], seed=3, **small),
        _request(PROMPT, users[2], seed=4, steps=3, height=64, width=64),  # another batch key
        _request(PROMPT, None, seed=5, **small),
    ]
    served = shared.handle(requests)
    assert isinstance(served[1], RequestError) and "not a complete adapter" in str(served[1])
    assert [r.shape for i, r in enumerate(served) if i != 1] == [(1, 1)] * 4
    # one at a time, as with batching off: the same images, within the tolerance (JPEG both)
    shared.batching = False
    try:
        alone = shared.handle(requests)
    finally:
        shared.batching = True
    assert isinstance(alone[1], RequestError)
    for i in (0, 2, 3, 4):
        max_diff, _ = pixel_diff(
            from_jpeg_base64(served[i][0][0]), from_jpeg_base64(alone[i][0][0])
        )
        assert max_diff <= MAX_DIFF + 2, i  # + JPEG: one rounding apart can move a block
    # request 3 ran alone (its own key), so it is exactly generate_images with the adapter
    from avatarforge.adapter import load_adapter
    from avatarforge.generate import to_jpeg_base64

    pipe = load_pipeline(tiny_base, device="cpu")
    load_adapter(pipe, users[2], tiny_base, "u2")
    expected = generate_images(pipe, PROMPT, None, GenArgs(seed=4, steps=3, height=64, width=64))
    assert served[3][0][0] == to_jpeg_base64(expected[0]).encode()


def test_batching_off_is_the_exact_one_row_path(shared, users, tiny_base):
    from avatarforge.adapter import load_adapter
    from avatarforge.generate import to_jpeg_base64

    requests = [_request(PROMPT, u, seed=7, steps=2, height=64, width=64) for u in users[:2]]
    shared.batching = False
    try:
        served = shared.handle(requests)
    finally:
        shared.batching = True
    for user, result in zip(users[:2], served, strict=True):
        pipe = load_pipeline(tiny_base, device="cpu")
        load_adapter(pipe, user, tiny_base, "user")
        image = generate_images(pipe, PROMPT, None, GenArgs(seed=7, steps=2, height=64, width=64))
        assert result[0][0] == to_jpeg_base64(image[0]).encode()


# ---------------------------------------------------------------- planning, without a pipeline


def _job(request, adapter="a", **args):
    return Job(request, 0, Row("p", None, GenArgs(**args)), adapter)


def test_plan_groups_compatible_rows_and_respects_the_limits():
    jobs = [
        _job(0, "a"), _job(1, "b", steps=20), _job(2, "c"), _job(3, "a", num_images=3),
        _job(4, None), _job(5, "d"), _job(6, "e"),
    ]  # fmt: skip
    calls = plan_batches(jobs, max_images=4, max_adapters=3)
    assert [[j.request for j in call] for call in calls] == [[0, 2, 4, 5], [6], [1], [3]]
    # distinct adapters per call are capped (the slots of one call); no adapter is free
    calls = plan_batches(jobs, max_images=8, max_adapters=2)
    assert [[j.request for j in call] for call in calls] == [[0, 2, 4], [5, 6], [1], [3]]
    # a sampler with noise per step and several odd-sized images per row runs alone
    odd = GenArgs(scheduler="euler_a", num_images=2, height=72, width=72)
    assert batch_key(odd) is None and batch_key(GenArgs(scheduler="euler_a", num_images=2))
    alone = [_job(0, **odd.to_dict()), _job(1, **odd.to_dict())]
    assert plan_batches(alone, 8, 8) == [[alone[0]], [alone[1]]]


def _fake_image(job):
    from PIL import Image

    return Image.new("RGB", (8, 8), (40 * job.row.args.seed % 256, 0, 0))


def test_a_failed_batch_is_retried_row_by_row_and_fails_alone():
    calls = []

    def run(jobs):
        calls.append([j.request for j in jobs])
        if any(j.row.prompt == "boom" for j in jobs):
            raise RuntimeError("boom")
        return [[_fake_image(j)] * j.row.args.num_images for j in jobs]

    def batchable(adapter):
        if adapter == "broken":
            raise AdapterError("broken is not a complete adapter")
        return adapter != "old-way"

    u3_twice = np.array([[b"u3"], [b"u3"]], dtype=object)
    requests = [
        _request("a", "u1", seed=1),
        _request("boom", "u2", seed=2),
        _request("c", "broken", seed=3),
        _request("d", "old-way", seed=4),
        _request("e", "u1", seed=5),
        {"prompt": np.array([[b"f"], [b"g"]], dtype=object), "adapter": u3_twice},
    ]
    from avatarforge.serving.shared_base import BASE_CLIENT_ERRORS

    results = handle_batched(requests, run, batchable, client_errors=BASE_CLIENT_ERRORS)
    assert calls == [[0, 1, 4, 5, 5], [0], [1], [4], [5], [5], [3]]
    assert str(results[1]).startswith("internal error (reference ")
    assert not results[1].client_fault and results[2].client_fault
    assert str(results[2]) == "broken is not a complete adapter"
    assert [r.shape for i, r in enumerate(results) if i not in (1, 2)] == [(1, 1)] * 3 + [(2, 1)]
    red = [from_jpeg_base64(r[0][0]).getpixel((0, 0))[0] for r in (results[0], results[4])]
    assert abs(red[0] - 40) <= 3 and abs(red[1] - 200) <= 3  # each request got its own rows


def test_serving_config_reaches_the_shared_base_from_the_instance():
    config = ServingConfig(adapter_cache_mib=512, batching=False, batch_max_images=4)
    env = config.to_env()
    expected = {"ADAPTER_CACHE_MIB": "512", "BATCHING": "false", "BATCH_MAX_IMAGES": "4"}
    assert {k: env["AVATARFORGE_SERVING_" + k] for k in expected} == expected
    assert ServingConfig.from_env(env) == config  # what the shared base reads
    assert flag("false", True) is False and flag("", True) is True and flag("1", False) is True
    with pytest.raises(ConfigError, match="true or false"):
        flag("maybe", True)
    with pytest.raises(ConfigError, match="serving.batching"):
        ServingConfig(batching="yes")
    defaults = ServingConfig()
    assert defaults.batching is True
    # >= 1000 default-rank SD 2.1 adapters: 6.11 MiB each, 8 MiB once pinned for a GPU
    assert defaults.adapter_cache_mib // 8 >= 1000
