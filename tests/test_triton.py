"""The Triton repository served by the real tritonserver (tiny base, trained adapter, CPU).

One server per module (started once, always stopped), 64 px images in 2 steps. Equality with
`generate-local` is checked on decoded pixels: the local image goes through the same JPEG encoder
(q95) as the served one and the decoded images may differ by at most 2 (of 255) per pixel, 0.05
on average (measured: identical). The raw, unencoded image is no reference: the random tiny base
draws noise, on which JPEG alone costs ~24 dB PSNR.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.request

import numpy as np
import pytest
from fixtures.images import pixels
from fixtures.serving import thin_env_tarball
from fixtures.triton_core import standin_backend, standin_env
from tritonclient.utils import InferenceServerException

from avatarforge.adapter import load_adapter, read_adapter
from avatarforge.base.pipeline import load_pipeline
from avatarforge.generate import GenArgs, from_jpeg_base64, generate_images, to_jpeg_base64
from avatarforge.serving import bootstrap, client
from avatarforge.serving.config import ServingConfig, local_instance_env
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
    # counts are logged for CloudWatch every second (default: a minute)
    env = local_instance_env(tiny_base.path, tmp / "shared",
                             serving=ServingConfig(metrics_log_s=1))  # fmt: skip
    with tritonserver(
        [tmp / "repo"], load=["model_setup", *names], env=env, log_path=tmp / "triton.log",
        metrics_port=0,
    ) as running:  # fmt: skip
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
    # no negative_prompt, no gen_args: the instance's defaults (the tiny base on a CPU: 256 px,
    # 12 steps; a GPU instance: 512 px, 30 steps)
    http = server.client()
    out = client.infer(http, "alice", client.build_inputs([prompt]))
    image = from_jpeg_base64(out[0][0])
    assert image.size == (256, 256)


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


@pytest.mark.smoke
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


# ---------------------------------------------------------------- the shared base, from outside


def _text(name: str, value: str, rows: int = 1):
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput(name, [rows, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[value.encode()]] * rows, dtype=object))
    return tensor


def test_the_shared_base_answers_only_this_instances_user_models(server, prompt, tiny_base):
    # tritonserver's port serves the shared base like any model: a caller from outside with
    # bob's adapter folder (or any folder) gets one answer that says nothing, and no image
    client.generate(server.url, "alice", prompt, gen_args=SMALL)  # the shared base is up
    base = sd_base_name(tiny_base.content_hash)
    repo = server.log_path.parent / "repo"
    bob = str((repo / "bob" / "1" / "adapter").resolve())
    soon = f"{time.time() + 30:.3f}"
    forged = bootstrap.caller_mac(b"\0" * 32, bob, soon)
    deadline = [_text("deadline", soon), _text("auth", forged)]
    attempts = {
        "bob's adapter, no auth, no deadline": [_text("adapter", bob)],
        "bob's adapter, a forged auth": [_text("adapter", bob), *deadline],
        "a folder that does not exist": [_text("adapter", "/nowhere/1/adapter"), *deadline],
        "the repository's model folder": [_text("adapter", str(repo / "bob"))],
        "no adapter at all": [],
    }
    messages = set()
    for what, extra in attempts.items():
        inputs = [*client.build_inputs([prompt], None, [SMALL]), *extra]
        with pytest.raises(InferenceServerException) as err:
            server.client().infer(base, inputs)
        assert str(err.value.status()) == "400", what
        messages.add(err.value.message())
    assert messages == {bootstrap.CALLER_REFUSED}
    # a secret of the instance stands behind it: 0600, in its lock folder
    key = bootstrap.lock_folder(server.log_path.parent / "shared") / bootstrap.KEY_FILE
    assert key.stat().st_mode & 0o777 == 0o600
    # and bob's own model still answers
    assert client.generate(server.url, "bob", prompt, gen_args=SMALL)[0].size == (64, 64)


def test_requests_are_counted_per_user_on_the_metrics_endpoint(server, prompt):
    # Triton's own nv_inference_request_success counts a request its model answered with an
    # error inside a response as a success; ours count what the user got
    def counts() -> dict[tuple[str, str], float]:
        text = urllib.request.urlopen(server.metrics_url, timeout=30).read().decode()
        found = {}
        for line in text.splitlines():
            if line.startswith("avatarforge_requests_total{"):
                labels, value = line[len("avatarforge_requests_total{") :].split("} ")
                pairs = dict(p.split("=", 1) for p in labels.split(","))
                found[pairs["user"].strip('"'), pairs["outcome"].strip('"')] = float(value)
        return found

    before = counts()
    client.generate(server.url, "alice", prompt, gen_args=SMALL)
    with pytest.raises(client.ServingError):
        client.generate(server.url, "alice", prompt, gen_args={"steps": 0})
    after = counts()
    for outcome in ("served", "refused"):
        assert after[("alice", outcome)] == before.get(("alice", outcome), 0) + 1, outcome
    # and where CloudWatch sees them on SageMaker (no metrics port there): the log, in embedded
    # metric format, once a metrics_log_s (here 1 s) with requests
    time.sleep(1.1)
    client.generate(server.url, "alice", prompt, gen_args=SMALL)
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines()
             if line.startswith('{"_aws"')]  # fmt: skip
    alice = [line for line in lines if line["user"] == "alice"]
    assert sum(line["served"] for line in alice) >= 1 and sum(line["refused"] for line in alice)
    assert alice[-1]["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "avatarforge"


def test_an_answer_over_the_response_limit_is_refused_before_any_work(server, prompt):
    # SageMaker drops a response Body over 6 MB: 3 images of 1024 px (within the work budget)
    # could take 6.3 MB as base64 JPEGs of noise (2 of them, 4.2 MB, would be answered)
    big = {"height": 1024, "width": 1024, "steps": 2, "num_images": 3}
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as err:
        server.client().infer("alice", client.build_inputs([prompt], None, [big]))
    assert str(err.value.status()) == "400"
    assert "serving.max_response_bytes" in err.value.message()
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------- other cores, fresh instances


def test_a_core_that_raises_for_unknown_models_starts_the_shared_base(
    packaged_users, tiny_base, prompt, tmp_path
):
    # Triton cores from mid-2026 raise from is_model_ready for a model that is not loaded
    # (up to 2.69 it is False): a fresh instance's first user model must start the shared
    # base all the same
    backend = standin_backend(tmp_path / "backends")
    build_repository(tmp_path / "repo", [packaged_users["alice"]])
    env = {**local_instance_env(tiny_base.path, tmp_path / "shared"),
           **standin_env(raise_unknown=True)}  # fmt: skip
    args = [f"--backend-directory={backend}"]
    with tritonserver([tmp_path / "repo"], load=["alice"], env=env, extra_args=args,
                      log_path=tmp_path / "triton.log") as running:  # fmt: skip
        assert client.generate(running.url, "alice", prompt, gen_args=SMALL)[0].size == (64, 64)


def test_readiness_misses_of_the_shared_base_are_waited_out(
    packaged_users, tiny_base, prompt, tmp_path
):
    # Triton 2.51's BLS sometimes finds a loaded shared base "not ready" while another model
    # loads or unloads (make reliability met it once in 100 requests); here every other BLS
    # request meets it: each request is sent again at once and answered with its image
    backend = standin_backend(tmp_path / "backends")
    build_repository(tmp_path / "repo", [packaged_users["alice"], packaged_users["bob"]])
    env = {**local_instance_env(tiny_base.path, tmp_path / "shared"),
           **standin_env(miss_every=2)}  # fmt: skip
    args = [f"--backend-directory={backend}"]
    with tritonserver([tmp_path / "repo"], load=["alice", "bob"], env=env,
                      extra_args=args) as running:  # fmt: skip
        for user in ("alice", "bob", "alice", "bob"):
            assert client.generate(running.url, user, prompt, gen_args=SMALL)[0].size == (64, 64)
        http = running.client()
        pending = [http.async_infer(u, client.build_inputs([prompt], None, [SMALL]))
                   for u in ("alice", "bob") * 3]  # fmt: skip
        for p in pending:
            assert p.get_result().as_numpy("generated_image").shape == (1, 1)


class _GatedS3(http.server.BaseHTTPRequestHandler):
    """One object, held back until ``gate`` is set (a slow first download, on demand)."""

    body: bytes = b""
    gate = threading.Event()

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.gate.wait(120)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def test_a_fresh_instance_loads_a_user_at_once_and_answers_503_until_the_base_is_up(
    packaged_users, tiny_base, prompt, tmp_path
):
    # the serving env's download (from S3) is held back: the user model loads anyway, and a
    # request meanwhile waits 90% of the request timeout, then gets a 503 to retry; once the
    # download ends, the shared base starts and the same request is served
    from avatarforge.testing.aws_local import dummy_aws_env

    class Gated(_GatedS3):
        body = thin_env_tarball(tmp_path).read_bytes()
        gate = threading.Event()

    s3 = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gated)
    threading.Thread(target=s3.serve_forever, daemon=True).start()
    build_repository(tmp_path / "repo", [packaged_users["alice"]])
    env = {
        **local_instance_env(tiny_base.path, tmp_path / "shared", "s3://deploy/serve-env.tar.gz"),
        **dummy_aws_env(f"http://127.0.0.1:{s3.server_address[1]}"),
        "AVATARFORGE_SERVING_REQUEST_TIMEOUT_S": "4",
    }  # fmt: skip
    try:
        with tritonserver([tmp_path / "repo"], env=env) as running:
            loading = threading.Thread(target=running.load, args=("alice",), daemon=True)
            started = time.monotonic()
            loading.start()
            loading.join(20)
            loaded_after = time.monotonic() - started
            if loading.is_alive():  # the load waits for the download: let it end, and fail
                Gated.gate.set()
                loading.join(120)
            assert loaded_after < 20, "the user model's load waited for the shared base"
            started = time.monotonic()
            with pytest.raises(InferenceServerException) as err:
                running.client().infer("alice", client.build_inputs([prompt], None, [SMALL]))
            waited = time.monotonic() - started
            assert str(err.value.status()) == "503"
            assert err.value.message().startswith(bootstrap.BASE_STARTING)
            assert "retry" in err.value.message()
            assert 3.0 <= waited < 4.5, waited  # 90% of the request timeout, then the answer
            Gated.gate.set()
            deadline = time.monotonic() + 180
            while True:  # what a client does with a 503: send it again
                try:
                    image = client.generate(running.url, "alice", prompt, gen_args=SMALL)[0]
                    break
                except client.ServingError as exc:
                    assert "unavailable: " in str(exc) and time.monotonic() < deadline, exc
                    time.sleep(0.5)
            assert image.size == (64, 64)
    finally:
        Gated.gate.set()
        s3.shutdown()
