"""The bootstrap's S3 GET against servers that misbehave (issue 22).

Real HTTP servers on loopback ports stand in for S3 where S3 would have to misbehave: one that
redirects to another host, one that closes the body early, one that drips or stalls. The
bootstrap's own code runs unchanged against them (its endpoint comes from AWS_ENDPOINT_URL,
as with moto); the well-behaved path is tested against moto in test_bare_image.py.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from avatarforge.serving import bootstrap

BODY = bytes(range(256)) * 4  # 1024 bytes


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        server = self.server
        server.seen.append({k.lower(): v for k, v in self.headers.items()})
        mode = server.modes.pop(0) if len(server.modes) > 1 else server.modes[0]
        if mode.startswith("redirect:"):
            self.send_response(307)
            self.send_header("Location", mode.split(":", 1)[1] + self.path)
            self.send_header("x-amz-bucket-region", "eu-west-1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        if mode == "full":
            self.wfile.write(BODY)
        elif mode == "short":  # half the body, then the connection closes
            self.wfile.write(BODY[: len(BODY) // 2])
            self.close_connection = True
        elif mode == "drip":  # one byte at a time: every read returns, none is ever late
            for byte in BODY:
                if server.stopping.wait(0.2):
                    break
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        elif mode == "stall":  # headers, then silence
            server.stopping.wait(120)
        self.close_connection = True

    def log_message(self, *args):
        pass


class StandIn:
    """One server: ``modes`` is what it does for each GET (the last one repeats)."""

    def __init__(self, *modes: str) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.modes, self.server.seen = list(modes or ("full",)), []
        self.server.stopping = threading.Event()
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen = self.server.seen
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in(monkeypatch):
    """Start stand-ins; the first one made is where the bootstrap sends its GET."""
    started = []

    def start(*modes: str) -> StandIn:
        server = StandIn(*modes)
        if not started:
            monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
            monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        started.append(server)
        return server

    creds = {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "SECRET",
             "AWS_SESSION_TOKEN": "SESSION-TOKEN", "AWS_REGION": "us-east-1"}  # fmt: skip
    for key, value in creds.items():
        monkeypatch.setenv(key, value)
    yield start
    for server in started:
        server.stop()


def _download(tmp_path, **kwargs):
    return bootstrap.download("s3://bucket/env.tar.gz", tmp_path / "env.tar.gz", **kwargs)


def test_a_redirect_to_another_host_gets_no_credentials(stand_in, tmp_path):
    s3 = stand_in()
    elsewhere = stand_in("full")
    s3.server.modes = [f"redirect:http://localhost:{elsewhere.port}"]
    error = None
    try:
        _download(tmp_path, retries=0)
    except bootstrap.BootstrapError as exc:
        error = str(exc)
    assert s3.seen[0]["authorization"].startswith("AWS4-HMAC-SHA256 ")  # signed for s3
    leaked = [h for h in elsewhere.seen if {"authorization", "x-amz-security-token"} & set(h)]
    assert leaked == [], "signed headers were sent to a host they were not signed for"
    # a redirect is the bucket's region answering: say which region to configure
    assert error is not None and "HTTP 307" in error and "AWS_REGION=eu-west-1" in error
    assert list(tmp_path.iterdir()) == []


def test_container_credentials_are_not_sent_on_a_redirect(stand_in):
    creds = stand_in()
    elsewhere = stand_in("full")
    creds.server.modes = [f"redirect:http://localhost:{elsewhere.port}"]
    environ = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": creds.url + "/creds",
               "AWS_CONTAINER_AUTHORIZATION_TOKEN": "container-secret"}  # fmt: skip
    with pytest.raises(bootstrap.BootstrapError, match="HTTP Error 307"):
        bootstrap.credentials(environ)
    assert creds.seen[0]["authorization"] == "container-secret"
    assert elsewhere.seen == []


def test_a_body_shorter_than_its_content_length_is_refused(stand_in, tmp_path):
    stand_in("short")
    # no sha256 configured: only the length can tell
    with pytest.raises(bootstrap.BootstrapError, match="512 of 1024 bytes"):
        _download(tmp_path, retries=0)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_a_short_body_is_retried(stand_in, tmp_path):
    s3 = stand_in("short", "full")
    assert _download(tmp_path, retries=1).read_bytes() == BODY
    assert len(s3.seen) == 2


@pytest.mark.parametrize("mode", ["drip", "stall"])
def test_a_slow_server_meets_the_overall_deadline(stand_in, tmp_path, mode):
    stand_in(mode)  # 1024 bytes at 5 per second: 200 s for the whole body
    t0 = time.monotonic()
    with pytest.raises(bootstrap.BootstrapError, match=r"not done after 2 s"):
        _download(tmp_path, retries=3, deadline_s=2.0)  # retries stay inside the deadline too
    assert time.monotonic() - t0 < 4.0
    assert list(tmp_path.iterdir()) == []
