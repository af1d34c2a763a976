"""The Triton repository served by the real tritonserver (tiny base, trained adapter, CPU).

One server per module (started once, always stopped), 64 px images in 2 steps. Equality with
`generate-local` is checked on decoded pixels: the local image goes through the same JPEG encoder
(q95) as the served one and the decoded images may differ by at most 2 (of 255) per pixel, 0.05
on average (measured: identical). The raw, unencoded image is no reference: the random tiny base
draws noise, on which JPEG alone costs ~24 dB PSNR.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from fixtures.images import pixels

from avatarforge.adapter import load_adapter, read_adapter
from avatarforge.base.pipeline import load_pipeline
from avatarforge.generate import GenArgs, from_jpeg_base64, generate_images, to_jpeg_base64
from avatarforge.serving import client
from avatarforge.serving.config import local_instance_env
from avatarforge.serving.repository import build_repository
from avatarforge.serving.triton_config import sd_base_name
from avatarforge.tritonserver.launch import tritonserver

pytestmark = pytest.mark.integration

SMALL = {"steps": 2, "height": 64, "width": 64, "seed": 7}


@pytest.fixture(scope="module")
def prompt(trained_adapter) -> str:
    return f"a photo of {read_adapter(trained_adapter).token} person"


@pytest.fixture(scope="module")
def server(packaged_users, tiny_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton")
    names = build_repository(tmp / "repo", list(packaged_users.values()))
    env = local_instance_env(tiny_base.path, tmp / "shared")
    with tritonserver(
        [tmp / "repo"], load=["model_setup", *names], env=env, log_path=tmp / "triton.log"
    ) as running:
        print(f"\ntritonserver + model_setup + {names} ready in {running.started_s:.1f} s")
        yield running


def test_image_decodes_to_requested_size(server, prompt):
    images = client.generate(
        server.url, "alice", prompt, gen_args={**SMALL, "width": 80, "num_images": 2}
    )
    assert len(images) == 2
    assert [im.size for im in images] == [(80, 64), (80, 64)]
    assert images[0].format == "JPEG"


def test_output_equals_generate_local(server, prompt, trained_adapter, tiny_base):
    args = {**SMALL, "seed": 11}
    served = client.generate(server.url, "alice", prompt, "blurry", args)[0]
    pipe = load_pipeline(tiny_base, device="cpu")
    load_adapter(pipe, trained_adapter, tiny_base, "user")
    local = generate_images(pipe, prompt, "blurry", GenArgs.parse(args))[0]
    local_jpeg = from_jpeg_base64(to_jpeg_base64(local))
    diff = np.abs(pixels(served) - pixels(local_jpeg))
    print(f"\nserved vs generate-local: max abs diff {diff.max()}, mean {diff.mean():.4f}")
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_omitted_negative_prompt_works(server, prompt):
    out = client.infer(server.client(), "alice", client.build_inputs([prompt], None, [SMALL]))
    assert from_jpeg_base64(out[0][0]).size == (64, 64)


@pytest.mark.slow
def test_omitted_optional_inputs_work(server, prompt):
    # no negative_prompt, no gen_args: the defaults (512 px, 30 steps; ~90 s on 2 CPU cores)
    http = server.client()
    out = client.infer(http, "alice", client.build_inputs([prompt]))
    image = from_jpeg_base64(out[0][0])
    assert image.size == (512, 512)


def test_every_request_of_a_batch_is_answered(server, prompt):
    http = server.client()
    rows = [json.dumps({**SMALL, "seed": s}) for s in (1, 2, 3)]
    references = {}
    for user in ("alice", "bob"):
        out = client.infer(http, user, client.build_inputs([prompt] * 3, None, rows))
        assert out.shape == (3, 1)
        references[user] = [from_jpeg_base64(b) for b in out[:, 0]]
        assert len({im.tobytes() for im in references[user]}) == 3  # three seeds, three images
    # alice and bob have different adapters: a mix-up below could not go unseen
    for a, b in zip(references["alice"], references["bob"], strict=True):
        assert np.abs(pixels(a) - pixels(b)).mean() > 1.0
    # interleaved concurrent requests of two users reach the shared base together; each is
    # answered with its own user's pixels
    order = (("alice", 1), ("bob", 2), ("alice", 3), ("bob", 1), ("alice", 2), ("bob", 3))
    pending = [
        http.async_infer(user, client.build_inputs([prompt], None, [{**SMALL, "seed": s}]))
        for user, s in order
    ]
    answers = [from_jpeg_base64(p.get_result().as_numpy("generated_image")[0][0]) for p in pending]
    for (user, seed), image in zip(order, answers, strict=True):
        own = np.abs(pixels(image) - pixels(references[user][seed - 1])).max()
        assert own <= 4, (user, seed, own)  # batched with others: float rounding, then JPEG


@pytest.mark.parametrize(
    ("gen_args", "field"),
    [
        ({"steps": 0}, "gen_args.steps"),
        ({"height": 100}, "gen_args.height"),
        ({"scheduler": "nope"}, "gen_args.scheduler"),
        ({"colour": "red"}, "colour"),
        ("{not json", "gen_args"),
    ],
)
def test_bad_gen_args_get_an_error_naming_the_field(server, prompt, gen_args, field):
    with pytest.raises(client.ServingError) as err:
        client.generate(server.url, "alice", prompt, gen_args=gen_args)
    assert field in str(err.value)
    assert not isinstance(err.value, client.ModelNotFoundError)
    # and the server keeps serving
    assert client.generate(server.url, "alice", prompt, gen_args=SMALL)[0].size == (64, 64)


def test_a_clients_mistake_is_http_400_not_500(server, prompt):
    # the shared base answers INVALID_ARG and the user model forwards the code: a client (or
    # SageMaker) must not retry a request that can never succeed as if the server had failed
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as err:
        server.client().infer("alice", client.build_inputs([prompt], None, [{"steps": 0}]))
    assert str(err.value.status()) == "400", err.value
    assert "gen_args.steps" in err.value.message()


def test_bad_request_in_a_batch_fails_alone(server, prompt):
    http = server.client()
    good = http.async_infer("alice", client.build_inputs([prompt], None, [SMALL]))
    bad = http.async_infer("bob", client.build_inputs([prompt], None, [{"steps": -1}]))
    assert good.get_result().as_numpy("generated_image").shape == (1, 1)
    with pytest.raises(Exception, match=r"gen_args\.steps"):
        bad.get_result()


def test_unknown_user_is_a_clear_not_found(server, prompt):
    with pytest.raises(client.ModelNotFoundError, match="carol"):
        client.generate(server.url, "carol", prompt, gen_args=SMALL)


def test_users_share_one_base_process(server, tiny_base):
    assert server.client().is_model_ready(sd_base_name(tiny_base.content_hash))
    assert server.log_path.read_text().count("successfully loaded 'sd_base_") == 1


def test_restarted_server_loads_a_user_without_model_setup(
    packaged_users, base_tarball, tiny_base, prompt, tmp_path
):
    # A fresh instance: empty shared dir, base only as a tarball, model_setup never loaded.
    build_repository(tmp_path / "repo", [packaged_users["alice"]])
    env = local_instance_env(base_tarball, tmp_path / "shared")
    with tritonserver([tmp_path / "repo"], load=["alice"], env=env) as running:
        images = client.generate(running.url, "alice", prompt, gen_args=SMALL)
        assert images[0].size == (64, 64)
        assert not running.client().is_model_ready("model_setup")
    installed = tmp_path / "shared" / "base" / tiny_base.content_hash[:16]
    assert installed.is_dir() and not installed.is_symlink()


def test_a_request_over_the_work_budget_is_a_400_answered_at_once(server, prompt):
    # 2 rows x 150 steps at 1024 px: 1200 512x512 steps, over the default 600 (minutes on a CPU)
    from tritonclient.utils import InferenceServerException

    big = {"height": 1024, "width": 1024, "steps": 150}
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as err:
        server.client().infer("alice", client.build_inputs([prompt] * 2, None, [big] * 2))
    assert str(err.value.status()) == "400"
    assert "serving.max_request_cost" in err.value.message()
    assert time.monotonic() - started < 10


def test_models_loaded_as_the_server_starts_serve(packaged_users, tiny_base, prompt, tmp_path):
    # --load-model: initialize() runs before the server answers model questions; the shared
    # base then starts with the first request
    build_repository(tmp_path / "repo", [packaged_users["alice"]])
    env = local_instance_env(tiny_base.path, tmp_path / "shared")
    start = ["--load-model=model_setup", "--load-model=alice"]
    with tritonserver([tmp_path / "repo"], extra_args=start, env=env) as running:
        assert running.client().is_model_ready("alice")
        assert client.generate(running.url, "alice", prompt, gen_args=SMALL)[0].size == (64, 64)


def test_a_server_that_cannot_start_the_shared_base_says_how_to_start_it(
    packaged_users, tiny_base, tmp_path
):
    # the default mode (none) loads the repository at start, but a model's load_model aborts
    # tritonserver 2.51 (boost lock_exception): the user model refuses to start, and says why
    from avatarforge.tritonserver.launch import ServerError

    build_repository(tmp_path / "repo", [packaged_users["alice"]])
    env = local_instance_env(tiny_base.path, tmp_path / "shared")
    log = tmp_path / "triton.log"
    none = ["--model-control-mode=none"]
    with pytest.raises(ServerError), tritonserver([tmp_path / "repo"], extra_args=none, env=env,
                                                  log_path=log):  # fmt: skip
        pass
    assert "needs --model-control-mode=explicit" in log.read_text()
