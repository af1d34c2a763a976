"""A tiny HTTP front that speaks like the SageMaker runtime to a :class:`MultiModelLoader`.

``POST /endpoints/<name>/invocations`` with header ``X-Amzn-SageMaker-Target-Model: x.tar.gz``
loads (on first use) and invokes that model, as ``sagemaker-runtime invoke_endpoint`` with
``TargetModel`` does; the body (KServe v2 JSON for Triton) passes through unchanged.
``GET /ping`` answers 200 while the server behind it lives (503 once it died: `mme serve` then
exits, as a SageMaker container whose server died is replaced); ``GET /models`` lists the
loaded TargetModels, oldest use first.

Bounded like a server facing clients it does not control (:class:`BoundedHTTPServer`): a listen
backlog of 128 (a burst of connections queues instead of being reset), at most
``max_connections`` connections served at once (one more is answered 503 with Retry-After at
once, no thread started), a socket timeout (a client that stops sending, such as a body
shorter than its Content-Length, is answered 408 and closed; an idle connection is closed) and
a deadline on each whole request head and body (a client that trickles a byte at a time is
answered 408 and closed at ``read_deadline_s``, so a few cannot hold every connection).

:class:`Invoker` is what an MME does with one invocation, apart from HTTP: this front and the
local SageMaker runtime (:mod:`avatarforge.cloud.local_runtime`) both call it. Its errors carry
SageMaker's error code in the ``x-amzn-ErrorType`` header and the body
``{"message", "error", "type", ...}``, which is how botocore reads a SageMaker error
(``ValidationError``, ``ModelError`` with ``OriginalStatusCode``/``OriginalMessage``,
``ModelNotReadyException``, ``InternalFailure``). The HTTP status is the loader's: 404 unknown
TargetModel, 424 refused archive, failed load, no answer within the loader's invoke timeout or
a response body over SageMaker's 6 MB, 400 (or 507) error from the model, 413 request body over
6 MB, 429 not ready, 503 + Retry-After (``ServiceUnavailable``) when the model says to send the
request again (its error starts ``RETRY_PREFIX``), its process was restarted, or every loaded
model is busy.

With ``not_ready_while_loading`` a request for a model that is not loaded starts its load in
the background and is answered ``ModelNotReadyException`` until the load is done, as SageMaker
answers the first requests of a TargetModel it is still loading; without it (the default of
``avatarforge mme serve``) the request waits for the load.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..errors import AvatarforgeError
from ..safe_tar import UnsafeArchiveError
from .loader import (
    AllModelsBusyError,
    InvalidTargetModelError,
    InvokeError,
    MMEError,
    ModelLoadError,
    ModelUnavailableError,
    MultiModelLoader,
    UnknownTargetModelError,
    check_target_model,
)
from .protocol import TARGET_MODEL_HEADER

log = logging.getLogger(__name__)

# InvokeEndpoint's request and response Body: botocore's sagemaker-runtime model, BodyBlob max
MAX_BODY_BYTES = 6 * 1024 * 1024  # 6291456
MAX_CONNECTIONS = 64  # served at once; SageMaker's own front answers 503/429 past its limits
SOCKET_TIMEOUT_S = 30.0  # one read or write on a client's socket
READ_DEADLINE_S = 60.0  # a whole request head and body
RETRY_AFTER_S = 1  # what a 503 asks the client to wait
KEPT_LOAD_OUTCOMES = 256  # ended background loads whose outcome the next request is told
LISTEN_BACKLOG = 128
ERROR_TYPE_HEADER = "x-amzn-ErrorType"  # botocore reads a rest-json error's code from it
INVOKE_RE = re.compile(r"^/endpoints/([A-Za-z0-9-]{1,63})/invocations$")


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, independent of the server that sends it."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_reply(status: int, data: Any, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, json.dumps(data).encode(), "application/json", headers)


def error_reply(status: int, code: str, message: str, **fields: Any) -> Reply:
    """A SageMaker-shaped error: the code in the header, the message (and ``fields``, e.g.
    ModelError's OriginalStatusCode) in the body; ``error`` for plain HTTP clients."""
    body = {"message": message, "error": message, "type": code, **fields}
    return json_reply(status, body, ((ERROR_TYPE_HEADER, code),))


def retry_reply(message: str, code: str = "ServiceUnavailable") -> Reply:
    """503 + Retry-After: the same request will succeed later (botocore retries this code)."""
    reply = error_reply(503, code, message)
    return Reply(
        503, reply.body, reply.content_type, (*reply.headers, ("Retry-After", str(RETRY_AFTER_S)))
    )


def reply_for(exc: BaseException) -> Reply:
    """The SageMaker error an MME answers for one of the loader's exceptions."""
    if isinstance(exc, ModelUnavailableError | AllModelsBusyError):
        return retry_reply(str(exc))
    if isinstance(exc, InvalidTargetModelError):
        return error_reply(400, "ValidationError", str(exc))
    if isinstance(exc, UnknownTargetModelError):
        return error_reply(exc.status, "ValidationError", f"Failed to download model data: {exc}")
    if isinstance(exc, ModelLoadError | UnsafeArchiveError):
        return error_reply(
            424, "ModelError", str(exc), OriginalStatusCode=500, OriginalMessage=str(exc)
        )
    if isinstance(exc, InvokeError):
        side = "client" if 400 <= exc.triton_status < 500 else "server"
        return error_reply(
            exc.status,
            "ModelError",
            f'Received {side} error ({exc.triton_status}) from model with message "{exc}"',
            OriginalStatusCode=exc.triton_status,
            OriginalMessage=str(exc),
        )
    if isinstance(exc, TimeoutError):  # the model did not answer within invoke_timeout_s
        return error_reply(
            424,
            "ModelError",
            f"Your invocation timed out while waiting for a response from the model ({exc})",
        )  # SageMaker's answer; not retried by clients (5xx would be, piling work on the model)
    status = exc.status if isinstance(exc, MMEError) else 500
    return error_reply(status, "InternalFailure", f"{type(exc).__name__}: {exc}")


def too_large_response(target_model: str, size: int) -> Reply:
    """What the front answers for a model response over InvokeEndpoint's 6 MB: the model's
    fault (424 ModelError; the serving request budget refuses, before any work, what could be
    this large), never a body the real endpoint could not return."""
    message = (
        f"the response of {target_model} is {size} bytes, over the {MAX_BODY_BYTES}-byte limit "
        "of a real-time invocation's response; ask for fewer or smaller images"
    )
    return error_reply(424, "ModelError", message, OriginalStatusCode=200, OriginalMessage=message)


class Invoker:
    """One invocation of an MME endpoint: TargetModel + body in, a :class:`Reply` out."""

    def __init__(self, loader: MultiModelLoader, *, not_ready_while_loading: bool = False):
        self.loader = loader
        self.not_ready_while_loading = not_ready_while_loading
        self._lock = threading.Lock()
        self._loading: dict[str, Future[Any]] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()  # loads ended, oldest first
        self._threads: list[threading.Thread] = []

    def invoke(self, target_model: str | None, body: bytes, content_type: str | None) -> Reply:
        if not target_model:
            return error_reply(400, "ValidationError", f"{TARGET_MODEL_HEADER} header is required")
        try:
            if self.not_ready_while_loading and (waiting := self._not_ready(target_model)):
                return waiting
            response = self.loader.invoke_raw(
                target_model, body, content_type or "application/json"
            )
        except (MMEError, UnsafeArchiveError) as exc:
            return reply_for(exc)
        except Exception as exc:  # the front keeps serving; the caller sees what broke
            log.exception("invocation of %s failed", target_model)
            return reply_for(exc)
        if len(response.body) > MAX_BODY_BYTES:
            return too_large_response(target_model, len(response.body))
        return Reply(200, response.body, response.content_type or "application/json")

    def _not_ready(self, target_model: str) -> Reply | None:
        """None when the model is loaded (or its load just ended: its error is raised once,
        and the next request loads it again); else start or await its load: 429."""
        check_target_model(target_model)
        with self._lock:
            future = self._loading.get(target_model)
            if future is not None and future.done():
                del self._loading[target_model]
                self._ended.pop(target_model, None)
                future.result()  # raises the load's error for the caller's reply
                return None
            if future is None:
                if target_model in self.loader.loaded():
                    return None
                future = self._loading[target_model] = Future()
                thread = threading.Thread(
                    target=self._load, args=(target_model, future), name="mme-load", daemon=True
                )
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
                thread.start()
        return error_reply(
            429,
            "ModelNotReadyException",
            f"Model {target_model} is being loaded on the endpoint; retry the request",
        )

    def _load(self, target_model: str, future: Future[Any]) -> None:
        try:
            future.set_result(self.loader.load(target_model))
        except BaseException as exc:
            future.set_exception(exc.with_traceback(None))
        self._keep_outcome(target_model)

    def _keep_outcome(self, target_model: str) -> None:
        """The outcome of a load waits for the next request of that name; the oldest are
        forgotten (their next request loads again), so names asked for once keep nothing for
        good. (A method of its own: no frame a kept error holds refers to another's future.)"""
        with self._lock:
            self._ended[target_model] = None
            while len(self._ended) > KEPT_LOAD_OUTCOMES:
                oldest, _ = self._ended.popitem(last=False)
                future = self._loading.get(oldest)
                if future is not None and future.done():
                    del self._loading[oldest]

    def close(self, timeout: float = 60.0) -> None:
        """Wait for background loads (they register models the loader later unloads)."""
        for thread in self._threads:
            thread.join(timeout)


def read_body(request: BaseHTTPRequestHandler) -> bytes | Reply:
    """The request body, or the error a SageMaker endpoint answers for its size; a body that
    stops before its Content-Length is a 408 (the socket timed out) or a 400 (closed)."""
    raw = (request.headers.get("Content-Length") or "0").strip()
    try:  # digits only (RFC 9110): int() also reads "+5" and "1_0", which no peer means
        length = int(raw) if raw.isascii() and raw.isdigit() else -1
    except ValueError:
        length = -1
    if length < 0:
        return error_reply(400, "ValidationError", "Content-Length must be a byte count")
    if length > MAX_BODY_BYTES:
        return error_reply(
            413,
            "ValidationError",
            f"body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit of real-time "
            "invocations",
        )
    try:
        body = request.rfile.read(length)
    except TimeoutError:  # a pause longer than the socket timeout, or past the deadline
        request.close_connection = True
        return error_reply(
            408, "RequestTimeout", f"the body stopped before its {length} bytes (timed out)"
        )
    if len(body) < length:
        request.close_connection = True
        return error_reply(
            400, "ValidationError", f"body of {len(body)} bytes, Content-Length said {length}"
        )
    return body


def send_reply(request: BaseHTTPRequestHandler, reply: Reply) -> None:
    try:
        request.send_response(reply.status)
        request.send_header("Content-Type", reply.content_type)
        request.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(reply.body)
    except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (its timeout)
        log.info("client %s left before its %d answer", request.client_address[0], reply.status)


def raw_reply(reply: Reply, reason: str) -> bytes:
    """``reply`` as bytes for a socket whose request was never parsed; the connection closes."""
    head = (
        f"HTTP/1.1 {reply.status} {reason}\r\nContent-Type: {reply.content_type}\r\n"
        f"Content-Length: {len(reply.body)}\r\nConnection: close\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in reply.headers)
        + "\r\n"
    )
    return head.encode() + reply.body


class _DeadlineReader(io.RawIOBase):
    """A handler's socket as a raw stream whose reads end at the handler's deadline: each read
    waits at most the socket timeout and never past ``handler.read_deadline``."""

    def __init__(self, handler: DeadlineHandler) -> None:
        self.handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        handler = self.handler
        left = handler.read_deadline - time.monotonic()
        if left <= 0:
            handler.deadline_passed = True
            raise TimeoutError(f"request not received within {handler.read_deadline_s} s")
        sock = handler.connection
        sock.settimeout(min(handler.timeout or left, left))
        try:
            count = sock.recv_into(buffer)
        except TimeoutError:
            handler.deadline_passed = time.monotonic() >= handler.read_deadline
            raise
        finally:
            sock.settimeout(handler.timeout)
        handler.bytes_read += count
        return count


class DeadlineHandler(BaseHTTPRequestHandler):
    """A request handler whose every request head and body must arrive within
    ``read_deadline_s`` (``timeout`` bounds each read only: one byte a second never hits it).
    A head that misses it is answered 408 and the connection closed; a body: see read_body."""

    read_deadline_s = READ_DEADLINE_S

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineReader(self))

    def handle_one_request(self) -> None:
        self.read_deadline = time.monotonic() + self.read_deadline_s
        self.deadline_passed = self.answered = False
        self.bytes_read = 0  # of this request (an idle keep-alive connection closes silently)
        super().handle_one_request()
        if self.deadline_passed and not self.answered and self.bytes_read:
            reply = error_reply(
                408, "RequestTimeout", f"request not received within {self.read_deadline_s} s"
            )
            with contextlib.suppress(OSError):
                self.connection.settimeout(1.0)
                self.connection.sendall(raw_reply(reply, "Request Timeout"))
            self.close_connection = True

    def send_response(self, code: int, message: str | None = None) -> None:
        self.answered = True
        super().send_response(code, message)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet waited for, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _handler_class(
    invoker: Invoker, healthy: Callable[[], bool] | None = None
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "avatarforge-mme"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.client_address[0], *args)

        def do_GET(self) -> None:
            if self.path == "/ping":
                if healthy is None or healthy():
                    send_reply(self, Reply(200, b"", "text/plain"))
                else:  # SageMaker stops routing to (and replaces) an instance that fails /ping
                    send_reply(self, retry_reply("the model server behind this front is gone"))
            elif self.path == "/models":
                send_reply(self, json_reply(200, {"loaded": invoker.loader.loaded()}))
            else:
                send_reply(self, error_reply(404, "UnknownOperation", f"no route GET {self.path}"))

        def do_POST(self) -> None:
            if not INVOKE_RE.match(self.path):
                send_reply(self, error_reply(404, "UnknownOperation", f"no route POST {self.path}"))
                return
            body = read_body(self)
            if isinstance(body, Reply):
                send_reply(self, body)
                return
            reply = invoker.invoke(
                self.headers.get(TARGET_MODEL_HEADER), body, self.headers.get("Content-Type")
            )
            send_reply(self, reply)

    return Handler


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once; see the module's doc."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, handler, max_connections: int = MAX_CONNECTIONS) -> None:
        super().__init__(address, handler)
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse_busy(self, request) -> None:
        reply = retry_reply(f"all {self.max_connections} connections are busy; retry")
        try:
            request.settimeout(1.0)
            request.sendall(raw_reply(reply, "Service Unavailable"))
        except OSError:
            pass  # the client is gone already
        finally:
            self.shutdown_request(request)


@contextlib.contextmanager
def serve_http(
    handler: type[BaseHTTPRequestHandler],
    host: str = "127.0.0.1",
    port: int = 0,
    name: str = "",
    *,
    max_connections: int = MAX_CONNECTIONS,
    socket_timeout_s: float = SOCKET_TIMEOUT_S,
    read_deadline_s: float = READ_DEADLINE_S,
) -> Iterator[str]:
    """Serve ``handler`` in a background thread for the block; yields the base URL."""
    limits = {"timeout": socket_timeout_s, "read_deadline_s": read_deadline_s}
    bounded = type(handler.__name__, (DeadlineHandler, handler), limits)
    server = BoundedHTTPServer((host, port), bounded, max_connections)
    thread = threading.Thread(target=server.serve_forever, name=name or "http", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def mme_front(
    loader: MultiModelLoader,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    not_ready_while_loading: bool = False,
    healthy: Callable[[], bool] | None = None,
) -> Iterator[str]:
    """Serve the front in a background thread for the block; yields its base URL. ``healthy``:
    whether the server behind it lives (else /ping answers 503)."""
    invoker = Invoker(loader, not_ready_while_loading=not_ready_while_loading)
    try:
        with serve_http(
            _handler_class(invoker, healthy),
            host,
            port,
            "mme-front",
            max_connections=loader.config.max_connections,
            socket_timeout_s=loader.config.socket_timeout_s,
            read_deadline_s=loader.config.read_deadline_s,
        ) as url:
            yield url
    finally:
        invoker.close()


class EndpointError(AvatarforgeError, RuntimeError):
    def __init__(self, status: int, message: str, code: str = "", retry_after: float = 0) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after  # seconds the server asked to wait (503)


# What a client sends again: the model or front says so (503, Retry-After), or the TargetModel
# is loading (429 ModelNotReadyException). Never another 4xx: the request itself is wrong.
RETRY_STATUSES = (429, 503)


def invoke_endpoint(
    url: str,
    target_model: str,
    payload: dict[str, Any],
    *,
    endpoint: str = "local-mme",
    timeout: float = 120.0,
    retry_s: float = 180.0,
    on_retry: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    """Client of the front: KServe v2 JSON in and out; :class:`EndpointError` otherwise.

    A 503 or 429 (:data:`RETRY_STATUSES`) is sent again, with exponential backoff and jitter
    (at least its Retry-After), for up to ``retry_s``; ``on_retry`` hears ``(reason, seconds)``
    before each wait. A body over SageMaker's 6 MB is refused here, before it is sent (the
    server would refuse it too, and close the connection while it is still being written)."""
    from ..serving.client import backoff_pause

    body = json.dumps(payload).encode()
    if len(body) > MAX_BODY_BYTES:
        raise EndpointError(
            413, f"request body of {len(body)} bytes is over the {MAX_BODY_BYTES}-byte limit"
        )
    request = urllib.request.Request(
        f"{url.rstrip('/')}/endpoints/{endpoint}/invocations",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", TARGET_MODEL_HEADER: target_model},
    )
    deadline = time.monotonic() + retry_s
    for attempt in itertools.count():
        try:
            return _invoke_once(request, timeout)
        except EndpointError as err:
            left = deadline - time.monotonic()
            if err.status not in RETRY_STATUSES or left <= 0:
                raise
            pause = min(left, max(err.retry_after, backoff_pause(attempt)))
            if on_retry is not None:
                on_retry(f"{target_model}: HTTP {err.status}: {err.message}", pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def _invoke_once(request: urllib.request.Request, timeout: float) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            body = err.read().decode(errors="replace")
            code = err.headers.get(ERROR_TYPE_HEADER, "")
            retry_after = err.headers.get("Retry-After", "")
        try:
            message = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            message = body
        wait = float(retry_after) if retry_after.isdigit() else 0.0
        raise EndpointError(err.code, message, code, wait) from None
