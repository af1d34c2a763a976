"""A tiny HTTP front that speaks like the SageMaker runtime to a :class:`MultiModelLoader`.

``POST /endpoints/<name>/invocations`` with header ``X-Amzn-SageMaker-Target-Model: x.tar.gz``
loads (on first use) and invokes that model, as ``sagemaker-runtime invoke_endpoint`` with
``TargetModel`` does; the body (KServe v2 JSON for Triton) passes through unchanged. Errors are
``{"error": ..., "type": ...}`` with the status the loader's exception carries (404 unknown
TargetModel, 424 refused archive or failed load, 413 body over SageMaker's 6 MB).
``GET /ping`` answers 200; ``GET /models`` lists the loaded TargetModels, oldest use first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..safe_tar import UnsafeArchiveError
from .loader import MMEError, MultiModelLoader
from .protocol import TARGET_MODEL_HEADER

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 6 * 1024 * 1024  # SageMaker real-time invocation limit
_INVOKE_RE = re.compile(r"^/endpoints/([A-Za-z0-9-]{1,63})/invocations$")


def _handler_class(loader: MultiModelLoader) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "avatarforge-mme"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.client_address[0], *args)

        def do_GET(self) -> None:
            if self.path == "/ping":
                self._send(200, b"", "text/plain")
            elif self.path == "/models":
                self._json(200, {"loaded": loader.loaded()})
            else:
                self._json(404, {"error": f"no route GET {self.path}"})

        def do_POST(self) -> None:
            if not _INVOKE_RE.match(self.path):
                self._json(404, {"error": f"no route POST {self.path}"})
                return
            target = self.headers.get(TARGET_MODEL_HEADER)
            if not target:
                self._json(400, {"error": f"{TARGET_MODEL_HEADER} header is required"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                self._json(400, {"error": "Content-Length must be a byte count"})
                return
            if length > MAX_BODY_BYTES:
                self._json(413, {"error": f"body of {length} bytes > {MAX_BODY_BYTES}"})
                return
            body = self.rfile.read(length)
            content_type = self.headers.get("Content-Type") or "application/json"
            try:
                response = loader.invoke_raw(target, body, content_type)
            except MMEError as exc:
                self._error(exc.status, exc)
            except UnsafeArchiveError as exc:
                self._error(424, exc)
            except Exception as exc:  # the front keeps serving; the caller sees what broke
                log.exception("invocation of %s failed", target)
                self._error(500, exc)
            else:
                self._send(200, response.body, response.content_type or "application/json")

        def _error(self, status: int, exc: BaseException) -> None:
            self._json(status, {"error": str(exc), "type": type(exc).__name__})

        def _json(self, status: int, data: Any) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def mme_front(loader: MultiModelLoader, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve the front in a background thread for the block; yields its base URL."""
    server = ThreadingHTTPServer((host, port), _handler_class(loader))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="mme-front", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class EndpointError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def invoke_endpoint(
    url: str,
    target_model: str,
    payload: dict[str, Any],
    *,
    endpoint: str = "local-mme",
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Client of the front: KServe v2 JSON in and out; :class:`EndpointError` otherwise."""
    request = urllib.request.Request(
        f"{url.rstrip('/')}/endpoints/{endpoint}/invocations",
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json", TARGET_MODEL_HEADER: target_model},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            body = err.read().decode(errors="replace")
        try:
            message = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            message = body
        raise EndpointError(err.code, message) from None
