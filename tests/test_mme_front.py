"""The MME front under clients it does not control: slow bodies, many connections, bursts.

No tritonserver is needed: every request here is answered by the front itself (/ping, a body
that never completes, a refusal), so the loader's server is never asked.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from avatarforge.mme import MMEConfig, MultiModelLoader
from avatarforge.mme.front import mme_front

INVOKE = "/endpoints/local-mme/invocations"


@pytest.fixture
def front(tmp_path):
    def start(**config):
        loader = MultiModelLoader(
            "http://127.0.0.1:9", str(tmp_path / "source"), tmp_path / "models",
            MMEConfig(**config),
        )  # fmt: skip
        return mme_front(loader)

    return start


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_body_shorter_than_its_content_length_is_answered_408_and_closed(front):
    with front(socket_timeout_s=0.5) as url, socket.create_connection(_address(url)) as sock:
        sock.settimeout(10)
        sock.sendall(
            f"POST {INVOKE} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            'X-Amzn-SageMaker-Target-Model: alice.tar.gz\r\n\r\n{"inputs"'.encode()
        )
        started = time.monotonic()
        raw = _read_all(sock)  # returns only because the server closed the connection
        took = time.monotonic() - started
    assert _status(raw) == 408
    assert b"stopped before its 100 bytes" in raw
    assert took < 5  # answered at the socket timeout, not never


def test_a_connection_past_the_limit_gets_503_at_once_and_the_others_are_served(front):
    with front(max_connections=2, socket_timeout_s=5) as url:
        idle = [socket.create_connection(_address(url)) for _ in range(2)]  # hold both slots
        try:
            time.sleep(0.3)
            with socket.create_connection(_address(url)) as sock:
                sock.settimeout(3)
                sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                raw = _read_all(sock)
            assert _status(raw) == 503
            assert b"Retry-After: 1" in raw
            assert b"x-amzn-ErrorType: ServiceUnavailable" in raw
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.3)  # the held slots are released when their connections close
        with socket.create_connection(_address(url)) as sock:
            sock.settimeout(3)
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _status(_read_all(sock)) == 200


def test_a_burst_of_connections_is_answered_not_reset(front):
    # 100 clients connect at once (the old backlog of 5 reset some); each gets an HTTP answer
    with front(max_connections=200) as url:
        start = threading.Barrier(100)

        def ping(_):
            start.wait()
            with socket.create_connection(_address(url), timeout=20) as sock:
                sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return _status(_read_all(sock))

        with ThreadPoolExecutor(100) as pool:
            statuses = list(pool.map(ping, range(100)))
    assert statuses == [200] * 100


def test_clients_that_trickle_their_request_head_are_cut_off_at_the_deadline(front):
    # four clients at the cap, each sending a header byte every 0.2 s (never idle as long as
    # the socket timeout): without a deadline on the whole head they hold every slot for good
    with front(max_connections=4, socket_timeout_s=5, read_deadline_s=1.0) as url:
        slow = [socket.create_connection(_address(url)) for _ in range(4)]
        stop = threading.Event()

        def trickle(sock: socket.socket) -> None:
            for byte in b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                if stop.wait(0.2):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return

        threads = [threading.Thread(target=trickle, args=(s,), daemon=True) for s in slow]
        for thread in threads:
            thread.start()
        try:
            time.sleep(2.0)  # past the deadline of every slow head
            with socket.create_connection(_address(url)) as sock:
                sock.settimeout(3)
                sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert _status(_read_all(sock)) == 200
            stop.set()
            for sock in slow:
                sock.settimeout(3)
                assert _status(_read_all(sock)) == 408  # told why, then closed
        finally:
            stop.set()
            for sock in slow:
                sock.close()


def test_target_models_that_were_asked_for_leave_no_state_behind(tmp_path):
    # every TargetModel name once asked for used to keep a lock (and, when not ready answers
    # 429, a future holding its error and frames): 50,000 unknown names added 55.6 MiB
    import gc
    import tracemalloc

    from avatarforge.mme import UnknownTargetModelError
    from avatarforge.mme.front import Invoker

    (tmp_path / "source").mkdir()
    loader = MultiModelLoader("http://127.0.0.1:9", str(tmp_path / "source"), tmp_path / "m")
    invoker = Invoker(loader, not_ready_while_loading=True)

    def ask(names: range) -> None:
        for i in names:
            with pytest.raises(UnknownTargetModelError):
                loader.load(f"nobody-{i}.tar.gz")
            assert invoker.invoke(f"later-{i}.tar.gz", b"{}", None).status == 429
        invoker.close()

    # the first 400 names fill what is bounded (the last 256 outcomes, tables that grow once);
    # 400 more must add nothing: each name used to keep about 9 KiB
    tracemalloc.start()
    try:
        ask(range(400))
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        ask(range(400, 800))
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    print(f"400 more unknown names (load and not-ready): {grown / 1024:.0f} KiB kept")
    assert grown < 256 * 1024, grown
