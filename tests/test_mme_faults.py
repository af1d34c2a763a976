"""Processes of the local MME killed as the kernel's OOM killer would, and what clients get.

A user model's python stub SIGKILLed: Triton 2.51 answers that model 400 "Stub process ... is
not healthy" for good, and its unload waits 350 s (a request that met the dead stub leaks a
reference to the model). The loader loads the model again under a new name and answers 503
meanwhile; a stop stays bounded. tritonserver SIGKILLed: `mme serve` fails /ping and exits,
as the SageMaker container whose server died (SageMaker then replaces the instance).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from fixtures.mme import output_of, scale_request
from fixtures.processes import children

from avatarforge.mme import MMEConfig, MultiModelLoader, model_hash
from avatarforge.mme.front import EndpointError, invoke_endpoint, mme_front
from avatarforge.netutil import free_port
from avatarforge.tritonserver.sagemaker import sagemaker_triton

pytestmark = pytest.mark.integration


def _kill_and_wait(pid: int, parent: int, text: str) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid in children(parent, text) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_user_models_dead_process_is_loaded_again_and_answered_503_meanwhile(
    mme_source, tmp_path
):
    with sagemaker_triton(tmp_path / "triton") as server:
        loader = MultiModelLoader(server.sagemaker_url, str(mme_source), tmp_path / "models",
                                  MMEConfig(), check_model=None)  # fmt: skip
        try:
            with mme_front(loader) as url:
                for user, answer in (("alice", [2.0]), ("bob", [3.0])):
                    out = invoke_endpoint(url, f"{user}.tar.gz", scale_request([1]), retry_s=0)
                    assert output_of(out) == answer
                (stub,) = children(server.pid, "alice.tar.gz")
                _kill_and_wait(stub, server.pid, "alice.tar.gz")
                started = time.monotonic()
                with pytest.raises(EndpointError) as info:
                    invoke_endpoint(url, "alice.tar.gz", scale_request([1]), retry_s=0)
                took = time.monotonic() - started
                assert (info.value.status, info.value.code) == (503, "ServiceUnavailable")
                assert "process died" in info.value.message and "retry" in info.value.message
                assert took < 30, took
                # the next request is served, by a new process; bob was never touched
                out = invoke_endpoint(url, "alice.tar.gz", scale_request([2]), retry_s=0)
                assert output_of(out) == [4.0]
                (new_stub,) = children(server.pid, "alice.tar.gz")
                assert new_stub != stub
                assert sorted(loader.loaded()) == ["alice.tar.gz", "bob.tar.gz"]
                out = invoke_endpoint(url, "bob.tar.gz", scale_request([1]), retry_s=0)
                assert output_of(out) == [3.0]
        finally:
            stopping = time.monotonic()
            loader.unload_all()
    # Triton's unload of the dead model would wait 350 s; it is left to the server's stop
    # (--exit-timeout-secs=10), which ends the one leaked model
    stopped_after = time.monotonic() - stopping
    print(f"restart answered 503 in {took:.1f} s; stop took {stopped_after:.1f} s")
    assert stopped_after < 30, stopped_after
    assert not any((tmp_path / "models").iterdir())


def _ping(url: str) -> int | str:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError as exc:
        return type(exc).__name__


@pytest.mark.smoke
def test_mme_serve_fails_ping_and_exits_when_its_tritonserver_dies(mme_source, tmp_path):
    # scale models are no avatarforge packages (mme serve refuses them): /ping is what matters
    port = free_port()
    args = ["mme", "serve", "--source", str(mme_source), "--root", str(tmp_path / "models")]
    args += ["--port", str(port), "--base", str(tmp_path), "--shared-dir", str(tmp_path / "sh")]
    out = tmp_path / "serve.out"
    with open(out, "wb") as log:
        command = [sys.executable, "-m", "avatarforge", *args]
        env = {**os.environ, "COLUMNS": "200"}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while "TargetModels from" not in out.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        assert _ping(url) == 200
        (triton,) = children(process.pid, "tritonserver")
        os.kill(triton, signal.SIGKILL)
        killed = time.monotonic()
        # /ping stops answering 200 at once (503 while it stops, then nothing listens) ...
        pings = []
        while time.monotonic() - killed < 3:
            pings.append(_ping(url))
            time.sleep(0.1)
        assert pings[-1] != 200 and 200 not in pings[len(pings) // 2 :], pings
        # ... and the command exits non-zero, saying why
        assert process.wait(timeout=30) == 1
        text = out.read_text(errors="replace")
        assert "tritonserver" in text and "died" in text, text[-2000:]
        assert "Traceback" not in text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_stopping_with_an_older_model_busy_unloads_the_idle_ones_first(mme_source, tmp_path):
    # Triton 2.51's SageMaker unload lists every registered repository and crashes (SIGSEGV)
    # when one is gone; a busy model is left registered to the server's stop with its files
    # removed, so every idle model must be unloaded before (alice, older, is the busy one here)
    import threading

    from avatarforge.mme.front import process_alive

    with sagemaker_triton(tmp_path / "triton") as server:
        loader = MultiModelLoader(server.sagemaker_url, str(mme_source), tmp_path / "models",
                                  MMEConfig(), check_model=None)  # fmt: skip
        loader.invoke("bob.tar.gz", scale_request([1]))

        def slow_alice() -> None:  # ends when the server stops under it
            with contextlib.suppress(Exception):
                loader.invoke("alice.tar.gz", scale_request([-3, 30]))

        busy = threading.Thread(target=slow_alice, daemon=True)
        busy.start()
        while not loader.in_flight("alice.tar.gz"):
            time.sleep(0.05)
        loader.invoke("bob.tar.gz", scale_request([1]))  # bob is now the most recently used
        assert loader.loaded() == ["alice.tar.gz", "bob.tar.gz"]
        assert loader.unload_all(wait_s=0.2) == ["alice.tar.gz"]
        assert loader.client.get(model_hash("bob.tar.gz")) is None  # unloaded in Triton
        assert process_alive(server.pid), server.log_path.read_text()[-2000:]
    assert not any((tmp_path / "models").iterdir())
