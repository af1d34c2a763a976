"""Faults met with real processes, and what the next client gets.

A part of the server is SIGKILLed as the kernel's OOM killer would (the shared base's process,
tritonserver while it loads a user, an uploading process), or a client stops waiting, or the
server is stopped with a request in flight; each test checks the answer clients get and that
the server serves again without a manual step. Tiny base, CPU, 64 px in 2 steps unless said.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from fixtures.processes import children
from tritonclient.utils import InferenceServerException

from avatarforge.adapter import read_adapter
from avatarforge.serving import client
from avatarforge.serving.config import local_instance_env
from avatarforge.serving.repository import build_repository
from avatarforge.serving.triton_config import sd_base_name
from avatarforge.tritonserver.launch import tritonserver

pytestmark = pytest.mark.integration

SMALL = {"steps": 2, "height": 64, "width": 64, "seed": 7}


def test_a_killed_shared_base_is_restarted_and_the_next_request_served(
    packaged_users, trained_adapter, tiny_base, tmp_path
):
    prompt = f"a photo of {read_adapter(trained_adapter).token} person"
    build_repository(tmp_path / "repo", [packaged_users["alice"], packaged_users["bob"]])
    env = local_instance_env(tiny_base.path, tmp_path / "shared")
    base = sd_base_name(tiny_base.content_hash)
    with tritonserver(
        [tmp_path / "repo"], load=["alice", "bob"], env=env, log_path=tmp_path / "triton.log"
    ) as server:
        before = client.generate(server.url, "alice", prompt, gen_args=SMALL)
        (stub,) = children(server.process.pid, base)
        os.kill(stub, signal.SIGKILL)
        time.sleep(0.5)
        # the request that meets the dead process: a clear, retryable error, not a hang
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as err:
            server.client().infer("bob", client.build_inputs([prompt], None, [SMALL]))
        assert str(err.value.status()) == "503"  # UNAVAILABLE: send it again
        assert "restarted" in err.value.message() and "retry" in err.value.message()
        assert "Stub process" not in err.value.message()
        assert time.monotonic() - started < 120
        # then every user is served again, by a new process, with the same pixels as before
        after = client.generate(server.url, "alice", prompt, gen_args=SMALL)
        assert after[0].tobytes() == before[0].tobytes()
        assert client.generate(server.url, "bob", prompt, gen_args=SMALL)[0].size == (64, 64)
        (new_stub,) = children(server.process.pid, base)
        assert new_stub != stub


def test_work_nobody_waits_for_is_stopped_and_frees_the_base(
    packaged_users, trained_adapter, tiny_base, tmp_path
):
    # the instance says its clients wait 3 s; a request that needs ~40 s of CPU denoising
    # stops between two steps once they have stopped waiting, and the base is free again
    from avatarforge.serving.config import ServingConfig

    prompt = f"a photo of {read_adapter(trained_adapter).token} person"
    build_repository(tmp_path / "repo", [packaged_users["alice"]])
    env = local_instance_env(tiny_base.path, tmp_path / "shared",
                             serving=ServingConfig(request_timeout_s=3))  # fmt: skip
    long = {"steps": 40, "height": 512, "width": 512, "seed": 1}
    with tritonserver([tmp_path / "repo"], load=["alice"], env=env) as server:
        warm(server, "alice", prompt)
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as err:
            server.client().infer("alice", client.build_inputs([prompt], None, [long]))
        stopped_after = time.monotonic() - started
        assert str(err.value.status()) == "503"
        assert "serving.request_timeout_s" in err.value.message()
        assert "stopped after" in err.value.message()  # between steps, not skipped
        assert stopped_after < 20, stopped_after
        # free again at once (the 40 steps would take ~40 s more): on 2 busy cores one small
        # request may itself pass 3 s and be sent again
        started = time.monotonic()
        warm(server, "alice", prompt, within_s=15)
        assert time.monotonic() - started < 15


def warm(server, user: str, prompt: str, within_s: float = 120.0) -> None:
    """Send small requests until one is answered: the shared base of a fresh server comes up
    meanwhile (with a short request timeout a request waits for it only that long, and is
    answered 503, to be sent again)."""
    end = time.monotonic() + within_s
    while True:
        try:
            client.generate(server.url, user, prompt, gen_args=SMALL)
            return
        except client.ServingError as exc:
            if "unavailable: " not in str(exc) or time.monotonic() > end:
                raise
            time.sleep(0.5)


def test_shutdown_with_a_request_in_flight_is_bounded(mme_source, tmp_path):
    # alice's request sleeps 120 s; stopping the MME (models unloaded, tritonserver stopped)
    # must not wait for it: Triton's unload would, for as long as the request runs
    import threading

    from fixtures.mme import output_of, scale_request

    from avatarforge.mme import MMEConfig, MultiModelLoader
    from avatarforge.tritonserver.sagemaker import sagemaker_triton

    outcome = {}
    with sagemaker_triton(tmp_path / "triton") as server:
        loader = MultiModelLoader(server.sagemaker_url, str(mme_source), tmp_path / "models",
                                  MMEConfig(max_loaded=4), check_model=None)  # fmt: skip
        assert output_of(loader.invoke("bob.tar.gz", scale_request([1]))) == [3.0]

        def slow():
            try:
                outcome["answer"] = loader.invoke("alice.tar.gz", scale_request([-3, 120]))
            except Exception as exc:  # the server went away under it
                outcome["error"] = exc

        thread = threading.Thread(target=slow, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not loader.in_flight("alice.tar.gz") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # in alice's execute()
        started = time.monotonic()
        left = loader.unload_all(wait_s=1)
        assert left == ["alice.tar.gz"]  # bob (idle) was unloaded, alice left to the stop
    stopped_after = time.monotonic() - started
    thread.join(30)
    assert stopped_after < 30, stopped_after  # tritonserver: --exit-timeout-secs=10
    assert "error" in outcome and "answer" not in outcome
    assert not any((tmp_path / "models").iterdir())  # no model folder left behind


def test_a_server_killed_while_loading_a_user_serves_that_user_after_a_restart(
    packaged_users, trained_adapter, tiny_base, tmp_path
):
    # tritonserver and its stubs SIGKILLed while alice's model starts the shared base (its
    # stub is up, the base is being fetched and loaded); a new server on the same folders loads
    # her and answers, from what is left
    import threading

    from avatarforge.mme import MultiModelLoader
    from avatarforge.mme.generate import generate_request, images_from_response
    from avatarforge.tritonserver.sagemaker import sagemaker_triton

    source = str(packaged_users["alice"].parent)
    env = local_instance_env(tiny_base.path, tmp_path / "shared")
    root = tmp_path / "models"
    request = generate_request(f"a photo of {read_adapter(trained_adapter).token} person",
                               gen_args=SMALL)  # fmt: skip
    outcome = {}
    with sagemaker_triton(tmp_path / "triton", extra_env=env) as server:
        loader = MultiModelLoader(server.sagemaker_url, source, root)

        def load():
            try:
                loader.load("alice.tar.gz")
                outcome["loaded"] = True
            except Exception as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not children(server.pid, "sd_base_") and time.monotonic() < deadline:
            time.sleep(0.05)  # the user model is up and starting the shared base
        assert children(server.pid, "sd_base_"), "the shared base never started"
        os.killpg(server.pid, signal.SIGKILL)
        thread.join(60)
    assert outcome, outcome  # alice's load ended (it need not wait for the shared base)
    with sagemaker_triton(tmp_path / "triton", extra_env=env) as server:
        loader = MultiModelLoader(server.sagemaker_url, source, root)
        try:
            (image,) = images_from_response(loader.invoke("alice.tar.gz", request))
        finally:
            loader.unload_all()
    assert image.size == (64, 64)


@pytest.mark.smoke
def test_an_upload_killed_half_way_leaves_nothing_under_the_key(s3_bucket, tmp_path):
    # a 64 MiB package goes up as a multipart upload; its process is SIGKILLed once parts are
    # on their way: S3 shows no object under the key (and a later upload completes normally)
    import subprocess
    import sys

    import boto3

    from avatarforge.storage import upload

    big = tmp_path / "alice.tar.gz"
    big.write_bytes(os.urandom(64 << 20))
    uri = f"s3://{s3_bucket}/mme/alice.tar.gz"
    code = "import sys; from avatarforge.storage import upload; upload(sys.argv[1], sys.argv[2])"
    s3 = boto3.client("s3")
    process = subprocess.Popen([sys.executable, "-c", code, str(big), uri])
    try:
        deadline = time.monotonic() + 60
        while not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"):
            assert process.poll() is None, "the upload ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert "Contents" not in s3.list_objects_v2(Bucket=s3_bucket, Prefix="mme/")
    assert upload(big, uri) == uri
    assert s3.head_object(Bucket=s3_bucket, Key="mme/alice.tar.gz")["ContentLength"] == 64 << 20
