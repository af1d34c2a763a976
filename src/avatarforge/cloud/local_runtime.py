"""A local SageMaker runtime: the HTTP API that boto3's ``sagemaker-runtime`` client calls.

Point boto3 at it with ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=<url>`` (botocore's service id is
"SageMaker Runtime"); S3, SNS and SQS stay wherever ``AWS_ENDPOINT_URL`` points (moto here).
Two routes of the real service (botocore's model ``sagemaker-runtime/2017-05-13``):

- ``POST /endpoints/<name>/invocations`` (InvokeEndpoint) on a multi-model endpoint: the
  ``X-Amzn-SageMaker-Target-Model`` header and the body go to an :class:`~avatarforge.mme.front.
  Invoker` (the local MME: tritonserver's SageMaker front end + the TargetModel loader). Errors
  are SageMaker's: ``ValidationError``, ``ModelError`` (``OriginalStatusCode``,
  ``OriginalMessage``), ``ModelNotReadyException`` while a TargetModel loads, and
  ``ThrottlingException`` when :meth:`LocalRuntime.throttle_next` asks for it.
- ``POST /endpoints/<name>/async-invocations`` (InvokeEndpointAsync) on an async endpoint:
  ``X-Amzn-SageMaker-InputLocation``, ``-Inference-Id``, ``-Content-Type``, ``-Accept`` and
  ``-InvocationTimeoutSeconds`` go to an :class:`~.async_runner.AsyncRunner`; the answer is
  202 with ``X-Amzn-SageMaker-OutputLocation`` / ``-FailureLocation`` headers and
  ``{"InferenceId": ...}``.

Not emulated: request signatures are not checked (any credentials pass), there is no account,
no production variants (TargetVariant is ignored), no RequestTTLSeconds; the 60 s response
limit is the MME loader's ``invoke_timeout_s`` (raise it for a CPU, as the cloud demo does),
answered as SageMaker does (ModelError); the HTTP status of an MME error is the local loader's
(botocore raises by the ``x-amzn-ErrorType`` code, which is SageMaker's).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from ..mme.front import (
    INVOKE_RE,
    Invoker,
    Reply,
    error_reply,
    json_reply,
    read_body,
    send_reply,
    serve_http,
)
from ..mme.protocol import TARGET_MODEL_HEADER
from .async_runner import AsyncRunner, InvocationRejected

log = logging.getLogger(__name__)

RUNTIME_ENDPOINT_ENV = "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"  # botocore: "SageMaker Runtime"
_ASYNC_RE = re.compile(r"^/endpoints/([A-Za-z0-9-]{1,63})/async-invocations$")
_H = "X-Amzn-SageMaker-"
LOCAL_ACCOUNT = "123456789012"


@dataclass(frozen=True)
class Request:
    """One request the runtime answered (for tests and the demo's report)."""

    operation: str  # InvokeEndpoint, InvokeEndpointAsync, or the path when no route matched
    endpoint: str
    target_model: str | None
    status: int
    error_code: str | None


class LocalRuntime:
    """The routes above over named endpoints; serve with :func:`local_runtime`."""

    def __init__(
        self,
        realtime: Mapping[str, Invoker] | None = None,
        asynchronous: Mapping[str, AsyncRunner] | None = None,
    ) -> None:
        self.realtime = dict(realtime or {})
        self.asynchronous = dict(asynchronous or {})
        self.url = ""
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._throttle = 0

    def env(self) -> dict[str, str]:
        """The environment that points boto3's sagemaker-runtime client here."""
        return {RUNTIME_ENDPOINT_ENV: self.url}

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def throttle_next(self, count: int) -> None:
        """Answer the next ``count`` invocations with ThrottlingException (a busy endpoint)."""
        with self._lock:
            self._throttle = count

    def invoke(self, endpoint: str, target: str | None, body: bytes, ctype: str | None) -> Reply:
        if (throttled := self._throttled()) is not None:
            return throttled
        invoker = self.realtime.get(endpoint)
        if invoker is None:
            return self._no_endpoint(endpoint, "async-invocations")
        return invoker.invoke(target, body, ctype)

    def invoke_async(self, endpoint: str, headers: Mapping[str, str]) -> Reply:
        if (throttled := self._throttled()) is not None:
            return throttled
        runner = self.asynchronous.get(endpoint)
        if runner is None:
            return self._no_endpoint(endpoint, "invocations")
        location = headers.get(_H + "InputLocation")
        if not location:
            return error_reply(400, "ValidationError", "InputLocation is required")
        timeout = headers.get(_H + "InvocationTimeoutSeconds")
        try:
            accepted = runner.submit(
                location,
                inference_id=headers.get(_H + "Inference-Id"),
                content_type=headers.get(_H + "Content-Type"),
                accept=headers.get(_H + "Accept"),
                timeout_s=int(timeout) if timeout else None,
            )
        except (InvocationRejected, ValueError) as exc:
            return error_reply(400, "ValidationError", str(exc))
        return json_reply(
            202,
            {"InferenceId": accepted.inference_id},
            (
                (_H + "OutputLocation", accepted.output_location),
                (_H + "FailureLocation", accepted.failure_location),
            ),
        )

    def _throttled(self) -> Reply | None:
        with self._lock:
            if self._throttle <= 0:
                return None
            self._throttle -= 1
        return error_reply(400, "ThrottlingException", "Rate exceeded")

    def _no_endpoint(self, endpoint: str, other_route: str) -> Reply:
        kind = self.asynchronous if other_route == "async-invocations" else self.realtime
        if endpoint in kind:
            return error_reply(
                400,
                "ValidationError",
                f"Endpoint {endpoint} does not take this invocation: use {other_route}",
            )
        return error_reply(
            400, "ValidationError", f"Endpoint {endpoint} of account {LOCAL_ACCOUNT} not found."
        )

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)


def _handler_class(runtime: LocalRuntime) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "avatarforge-sagemaker-runtime"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.client_address[0], *args)

        def do_GET(self) -> None:
            if self.path == "/ping":
                send_reply(self, Reply(200, b"", "text/plain"))
            else:
                send_reply(self, error_reply(404, "UnknownOperation", f"no route GET {self.path}"))

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            target = self.headers.get(TARGET_MODEL_HEADER)
            body = read_body(self)
            if isinstance(body, Reply):
                reply, operation, endpoint = body, "InvokeEndpoint", ""
            elif match := INVOKE_RE.match(path):
                operation, endpoint = "InvokeEndpoint", match.group(1)
                reply = runtime.invoke(endpoint, target, body, self.headers.get("Content-Type"))
            elif match := _ASYNC_RE.match(path):
                operation, endpoint = "InvokeEndpointAsync", match.group(1)
                reply = runtime.invoke_async(endpoint, self.headers)
            else:
                operation, endpoint = path, ""
                reply = error_reply(404, "UnknownOperation", f"no route POST {path}")
            code = dict(reply.headers).get("x-amzn-ErrorType")
            runtime._record(Request(operation, endpoint, target, reply.status, code))
            send_reply(self, reply)

    return Handler


@contextlib.contextmanager
def local_runtime(
    realtime: Mapping[str, Invoker] | None = None,
    asynchronous: Mapping[str, AsyncRunner] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
) -> Iterator[LocalRuntime]:
    """Serve a :class:`LocalRuntime` on ``host:port`` for the block (always stopped)."""
    runtime = LocalRuntime(realtime, asynchronous)
    with serve_http(_handler_class(runtime), host, port, "sagemaker-runtime") as url:
        runtime.url = url
        yield runtime
