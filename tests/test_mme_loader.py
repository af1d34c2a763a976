"""The local MME loader under the conditions a busy endpoint meets: requests in flight while a
load needs room, TargetModels that are missing or refused, models gone behind its back, and
errors whose class (the caller's or the model's) must survive to the client.

Trivial python models (tests/fixtures/mme.py) on the real tritonserver with its SageMaker front
end: the scale model sleeps, fails as asked (INVALID_ARG or INTERNAL) or multiplies.
"""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path

import pytest
from fixtures.mme import output_of, scale_request

from avatarforge.mme import UnknownTargetModelError, model_hash
from avatarforge.mme.front import EndpointError, invoke_endpoint, mme_front
from avatarforge.mme.loader import InvokeError
from avatarforge.safe_tar import UnsafeArchiveError

pytestmark = pytest.mark.integration


def test_a_missing_or_refused_target_model_evicts_no_one(make_loader, mme_source: Path):
    loader = make_loader(str(mme_source), max_loaded=1)
    assert output_of(loader.invoke("alice.tar.gz", scale_request([1]))) == [2.0]
    with pytest.raises(UnknownTargetModelError):
        loader.invoke("nobody.tar.gz", scale_request([1]))
    with pytest.raises(UnsafeArchiveError):
        loader.invoke("evil.tar.gz", scale_request([1]))
    assert loader.loaded() == ["alice.tar.gz"]  # still loaded, still answering
    assert not (loader.root / model_hash("nobody.tar.gz")).exists()
    assert output_of(loader.invoke("alice.tar.gz", scale_request([2]))) == [4.0]


def test_a_model_with_a_request_in_flight_is_not_evicted(make_loader, mme_source: Path):
    # alice (older) is busy, carol (newer) idle: loading bob evicts carol, never alice
    loader = make_loader(str(mme_source), max_loaded=2)
    loader.invoke("alice.tar.gz", scale_request([1]))
    loader.invoke("carol.tar.gz", scale_request([1]))
    done: dict[str, object] = {}

    def slow_alice():
        done["alice"] = output_of(loader.invoke("alice.tar.gz", scale_request([-3, 8])))
        done["alice_at"] = time.monotonic()

    worker = threading.Thread(target=slow_alice)
    worker.start()
    while loader.in_flight("alice.tar.gz") == 0:
        time.sleep(0.05)
    # alice was used last, but she is busy: carol, idle, makes room
    started = time.monotonic()
    assert output_of(loader.invoke("bob.tar.gz", scale_request([1]))) == [3.0]
    bob_at = time.monotonic()
    print(f"bob loaded and answered in {bob_at - started:.1f} s while alice slept 8 s")
    assert "carol.tar.gz" not in loader.loaded() and "alice.tar.gz" in loader.loaded()
    worker.join(timeout=60)
    assert done["alice"] == [-6.0, 16.0]  # answered, not cut off by an unload
    assert bob_at < done["alice_at"]  # bob did not wait for alice's request


def test_with_every_model_busy_a_load_waits_for_one_to_finish(make_loader, mme_source: Path):
    loader = make_loader(str(mme_source), max_loaded=1)
    loader.invoke("alice.tar.gz", scale_request([1]))
    finished = {}

    def slow_alice():
        out = output_of(loader.invoke("alice.tar.gz", scale_request([-3, 2])))
        finished["alice"], finished["at"] = out, time.monotonic()

    worker = threading.Thread(target=slow_alice)
    worker.start()
    while loader.in_flight("alice.tar.gz") == 0:
        time.sleep(0.05)
    assert output_of(loader.invoke("bob.tar.gz", scale_request([1]))) == [3.0]
    worker.join(timeout=60)
    assert finished["alice"] == [-6.0, 4.0]  # alice finished first, then made room for bob
    assert loader.loaded() == ["bob.tar.gz"] and loader.in_flight("alice.tar.gz") == 0


def test_a_models_error_reaches_the_client_with_its_message(make_loader, mme_source: Path):
    # Triton 2.51's SageMaker front end answers every inference error 400, INTERNAL included
    # (on SageMaker: ModelError, OriginalStatusCode 400); the KServe endpoints keep the class
    # (INVALID_ARG 400, INTERNAL 500: tests/test_triton.py).
    loader = make_loader(str(mme_source))
    for value in (-1, -2):
        with pytest.raises(InvokeError, match="asked to fail") as info:
            loader.invoke("alice.tar.gz", scale_request([value]))
        assert (info.value.triton_status, info.value.status) == (400, 400)
    assert InvokeError("x", 503).status == 500  # the server's own failures are not the caller's
    assert InvokeError("x", 507).status == 507


def test_a_model_unloaded_behind_the_loaders_back_is_loaded_again(make_loader, mme_source):
    loader = make_loader(str(mme_source))
    loader.invoke("bob.tar.gz", scale_request([1]))
    loader.client.unload(model_hash("bob.tar.gz"), "bob.tar.gz")  # e.g. a server restart
    assert output_of(loader.invoke("bob.tar.gz", scale_request([2]))) == [6.0]  # Triton's 404
    assert loader.loaded() == ["bob.tar.gz"]


def test_a_body_over_six_megabytes_is_refused_before_it_is_read(make_loader, mme_source):
    loader = make_loader(str(mme_source))
    with mme_front(loader) as url:
        # our client refuses it before sending
        with pytest.raises(EndpointError) as info:
            invoke_endpoint(url, "alice.tar.gz", scale_request([1.0] * 1_500_000))
        assert info.value.status == 413
        # the front refuses one that announces it, without reading it
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.putrequest("POST", "/endpoints/local-mme/invocations")
        connection.putheader("X-Amzn-SageMaker-Target-Model", "alice.tar.gz")
        connection.putheader("Content-Length", str(7 * 2**20))
        connection.endheaders()
        assert connection.getresponse().status == 413
        connection.close()
        assert loader.loaded() == []  # refused before anything was loaded


def _listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as the kernel lists them) of TCP sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                found.append(address)
    return found


@pytest.mark.smoke
def test_the_sagemaker_port_listens_on_loopback_only(sagemaker_server):
    # tritonserver binds it on every interface, unauthenticated: anyone could POST /models
    port = int(sagemaker_server.sagemaker_url.rsplit(":", 1)[1])
    assert _listening_addresses(port) == ["0100007F"]  # 127.0.0.1, and nothing else


def test_model_folders_left_by_a_killed_loader_are_removed_at_start(sagemaker_server, tmp_path):
    from avatarforge.mme import MultiModelLoader, model_hash

    stale = tmp_path / "models" / model_hash("alice.tar.gz") / "model" / "alice"
    stale.mkdir(parents=True)
    (stale / "config.pbtxt").write_text("left by a crash")
    keep = tmp_path / "models" / "not-ours"
    keep.mkdir()
    MultiModelLoader(sagemaker_server.sagemaker_url, str(tmp_path), tmp_path / "models")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["not-ours"]


def test_users_alternating_in_parallel_past_max_loaded_are_all_answered(
    make_loader, mme_source: Path
):
    # three users, room for one, four clients at once: every request loads or evicts, and a
    # load of a user can meet the eviction of that same user still deleting its folder (which
    # `make reliability` found: "repository not found")
    from concurrent.futures import ThreadPoolExecutor

    from fixtures.mme import USERS

    loader = make_loader(str(mme_source), max_loaded=1)
    plan = [["alice", "bob", "carol"][(c + i) % 3] for c in range(4) for i in range(4)]

    def ask(user: str) -> tuple[str, list[float]]:
        return user, output_of(loader.invoke(f"{user}.tar.gz", scale_request([1.0])))

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, plan))
    assert answers == [(user, [USERS[user]]) for user in plan]  # each its own user's model
    assert loader.evictions >= 2 and len(loader.loaded()) == 1


def test_a_response_over_six_megabytes_is_refused_as_sagemaker_refuses_it(make_loader, mme_source):
    # InvokeEndpoint's request and response Body are each at most 6291456 bytes (botocore's
    # sagemaker-runtime model: BodyBlob max); a model that answers more is the model's fault
    from avatarforge.mme.front import MAX_BODY_BYTES

    assert MAX_BODY_BYTES == 6291456
    loader = make_loader(str(mme_source))
    with mme_front(loader) as url:
        # 2,000,000 values of "2.0": about 8 MB of KServe JSON
        with pytest.raises(EndpointError) as info:
            invoke_endpoint(url, "alice.tar.gz", scale_request([-5, 2_000_000]))
        assert (info.value.status, info.value.code) == (424, "ModelError")
        assert "6291456" in info.value.message
        out = invoke_endpoint(url, "alice.tar.gz", scale_request([-5, 1000]))
        assert output_of(out) == [2.0] * 1000
