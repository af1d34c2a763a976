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
