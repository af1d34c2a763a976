"""A local SageMaker asynchronous endpoint: S3 in, a bounded pool of workers, S3 + SNS out.

What a real async endpoint does with ``InvokeEndpointAsync(InputLocation=...)``, done here by
threads around a handler ``(body, content_type) -> bytes`` (the training service's
:func:`avatarforge.jobs.handle_invocation`, or any function with that signature):

- answer at once with an InferenceId, an OutputLocation ``<S3OutputPath>/<uuid>.out`` and a
  FailureLocation ``<S3FailurePath>/<uuid>-error.out`` (the uuid is the endpoint's, not the
  InferenceId: a client must keep the locations it was given, as with the real service);
- queue the invocation; at most ``max_concurrent`` run at once
  (MaxConcurrentInvocationsPerInstance of one instance), the rest wait in arrival order;
- read the input from S3, call the handler, and write its bytes to the output location, or,
  when it raises, an error document to the failure location;
- publish the notification JSON (:mod:`.notifications`) to the SuccessTopic or ErrorTopic.

Differences from the real service: one "instance" and no autoscaling; no RequestTTLSeconds
(queued invocations never expire); the InvocationTimeoutSeconds deadline marks the invocation
failed when it passes, but the handler cannot be killed: it keeps its worker slot until it
returns, and its late result is discarded (a real endpoint's container also keeps running it);
the failure document is the JSON of the training service's JobError (``status: failed``,
``code``, ``error``, its own ``to_dict()`` fields) plus ``type`` and ``inferenceId``, where a
real endpoint stores the model container's error response as is.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from ..deploy.config import DeployConfig
from ..errors import AvatarforgeError
from ..storage import StorageError
from .notifications import COMPLETED, FAILED, build_notification
from .s3 import read_object, write_json, write_object

log = logging.getLogger(__name__)

Handler = Callable[[bytes, str | None], bytes]

MAX_INVOCATION_TIMEOUT_S = 3600  # the async endpoint's limit
DEFAULT_INVOCATION_TIMEOUT_S = 900  # SageMaker's default when the request sets none
_INFERENCE_ID = re.compile(r"^\S[\x20-\x7e]{0,63}$")  # printable ASCII, <= 64 chars


class InvocationRejected(AvatarforgeError, ValueError):
    """The invocation is refused before it is queued (SageMaker's ValidationError)."""

    status = 400


@dataclass(frozen=True)
class AsyncEndpointConfig:
    """The AsyncInferenceConfig of one endpoint (what CreateEndpointConfig would hold)."""

    name: str
    output_path: str  # S3OutputPath
    failure_path: str  # S3FailurePath
    success_topic: str | None = None  # SNS topic ARNs; None: no notification
    error_topic: str | None = None
    max_concurrent: int = 2  # MaxConcurrentInvocationsPerInstance
    region: str = "us-east-1"

    def __post_init__(self) -> None:
        for name in ("output_path", "failure_path"):
            if not getattr(self, name).startswith("s3://"):
                raise ValueError(
                    f"{name}: an s3:// prefix is required (got {getattr(self, name)!r})"
                )
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent: must be >= 1 (got {self.max_concurrent})")

    @classmethod
    def for_deployment(
        cls, config: DeployConfig, success_topic: str | None, error_topic: str | None
    ) -> AsyncEndpointConfig:
        """The training endpoint of a deployment, as deploy configures it."""
        return cls(
            name=config.training_endpoint_name,
            output_path=config.async_output_prefix,
            failure_path=config.async_failure_prefix,
            success_topic=success_topic,
            error_topic=error_topic,
            max_concurrent=config.training_concurrency,
            region=config.region,
        )


@dataclass(frozen=True)
class Accepted:
    """The answer of InvokeEndpointAsync."""

    inference_id: str
    output_location: str
    failure_location: str


@dataclass(frozen=True)
class Invocation:
    """One invocation as the runner saw it (a snapshot; ``history()`` returns copies)."""

    inference_id: str
    input_location: str
    content_type: str | None
    accept: str | None
    timeout_s: int
    output_location: str
    failure_location: str
    received: datetime
    status: str = "queued"  # queued, running, Completed, Failed
    failure_reason: str | None = None
    started: float | None = None  # time.monotonic()
    finished: float | None = None


@dataclass
class _Outcome:
    result: bytes | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class AsyncRunner:
    """Runs queued invocations of one async endpoint with ``handler``; start() before use."""

    def __init__(self, config: AsyncEndpointConfig, handler: Handler, *, session: Any = None):
        import boto3

        session = session or boto3.session.Session()
        self.config = config
        self.handler = handler
        self._s3 = session.client("s3", region_name=config.region)
        self._sns = session.client("sns", region_name=config.region)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._records: dict[str, Invocation] = {}  # by inference id, in arrival order
        self._running = 0
        self.max_running = 0  # the most handlers that ever ran at once
        self._workers: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> AsyncRunner:
        for i in range(self.config.max_concurrent):
            worker = threading.Thread(
                target=self._work, name=f"{self.config.name}-worker-{i}", daemon=True
            )
            worker.start()
            self._workers.append(worker)
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking work; waits up to ``timeout`` for running handlers (queued ones are
        dropped, as on an endpoint that is deleted)."""
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        self._workers.clear()

    def __enter__(self) -> AsyncRunner:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the API

    def submit(
        self,
        input_location: str,
        *,
        inference_id: str | None = None,
        content_type: str | None = None,
        accept: str | None = None,
        timeout_s: int | None = None,
    ) -> Accepted:
        """Queue one invocation; :class:`InvocationRejected` for a request SageMaker refuses."""
        if not self._workers:
            raise RuntimeError("AsyncRunner.start() was not called")
        if not input_location.startswith("s3://") or len(input_location) <= len("s3://"):
            raise InvocationRejected(f"InputLocation must be an s3:// URI (got {input_location!r})")
        inference_id = inference_id or str(uuid.uuid4())
        if not _INFERENCE_ID.match(inference_id):
            raise InvocationRejected(
                f"InferenceId must be 1-64 printable characters (got {inference_id!r})"
            )
        timeout_s = DEFAULT_INVOCATION_TIMEOUT_S if timeout_s is None else timeout_s
        if not 1 <= timeout_s <= MAX_INVOCATION_TIMEOUT_S:
            raise InvocationRejected(
                f"InvocationTimeoutSeconds must be 1-{MAX_INVOCATION_TIMEOUT_S} (got {timeout_s})"
            )
        name = uuid.uuid4()  # the endpoint names its outputs, not the client
        record = Invocation(
            inference_id=inference_id,
            input_location=input_location,
            content_type=content_type,
            accept=accept,
            timeout_s=timeout_s,
            output_location=f"{self.config.output_path.rstrip('/')}/{name}.out",
            failure_location=f"{self.config.failure_path.rstrip('/')}/{name}-error.out",
            received=datetime.now(UTC),
        )
        key = f"{inference_id}#{name}"  # the same InferenceId may be sent again
        with self._lock:
            self._records[key] = record
        self._queue.put(key)
        log.info("%s: queued %s (%s)", self.config.name, inference_id, input_location)
        return Accepted(inference_id, record.output_location, record.failure_location)

    def history(self) -> list[Invocation]:
        """Every invocation so far, in arrival order."""
        with self._lock:
            return list(self._records.values())

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or running; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while any(r.status in ("queued", "running") for r in self._records.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    # ------------------------------------------------------------------ the workers

    def _work(self) -> None:
        while (key := self._queue.get()) is not None:
            try:
                self._run(key)
            except Exception as exc:  # a worker never dies: the next invocation must still run
                log.exception("%s: invocation %s broke the runner", self.config.name, key)
                if self._records[key].status in ("queued", "running"):
                    self._fail(key, 500, f"the endpoint failed: {exc}", "InternalFailure")

    def _update(self, key: str, **changes: Any) -> Invocation:
        with self._lock:
            record = self._records[key] = replace(self._records[key], **changes)
            if changes.get("status") in (COMPLETED, FAILED):
                self._idle.notify_all()
            return record

    def _run(self, key: str) -> None:
        record = self._update(key, status="running", started=time.monotonic())
        try:
            body = read_object(self._s3, record.input_location)
        except StorageError as exc:
            self._fail(key, 400, f"cannot read the input: {exc}", "InputError")
            return
        outcome = self._call(body, record)
        if not outcome.done.is_set():
            reason = (
                f"InvocationTimeout: the invocation did not finish within "
                f"InvocationTimeoutSeconds={record.timeout_s}"
            )
            self._fail(key, 408, reason, "InvocationTimeout", reason=reason)
            outcome.done.wait()  # the slot stays taken until the handler really returns
            log.warning("%s: %s returned after its deadline", self.config.name, key)
            return
        if outcome.error is not None:
            exc = outcome.error
            status = int(getattr(exc, "status", 0) or (400 if _client_fault(exc) else 500))
            to_dict = getattr(exc, "to_dict", None)  # JobError's own failure document
            extra = to_dict() if callable(to_dict) else {}
            self._fail(key, status, str(exc), type(exc).__name__, extra=extra)
            return
        self._succeed(key, outcome.result)

    def _call(self, body: bytes, record: Invocation) -> _Outcome:
        """The handler in its own thread, so the deadline can pass while it runs."""
        outcome = _Outcome()

        def run() -> None:
            with self._lock:
                self._running += 1
                self.max_running = max(self.max_running, self._running)
            try:
                result = self.handler(body, record.content_type)
                if not isinstance(result, bytes | bytearray):
                    raise TypeError(f"the handler returned {type(result).__name__}, not bytes")
                outcome.result = bytes(result)
            except Exception as exc:  # reported as the invocation's failure
                log.info("%s: %s failed: %s", self.config.name, record.inference_id, exc)
                outcome.error = exc
            finally:
                with self._lock:
                    self._running -= 1
                outcome.done.set()

        threading.Thread(target=run, name=f"{self.config.name}-handler", daemon=True).start()
        outcome.done.wait(record.timeout_s)
        return outcome

    def _succeed(self, key: str, result: bytes | None) -> None:
        record = self._records[key]
        try:
            write_object(self._s3, record.output_location, result or b"", "application/json")
        except StorageError as exc:
            self._fail(key, 500, f"cannot write the output: {exc}", "OutputError")
            return
        record = self._update(key, status=COMPLETED, finished=time.monotonic())
        self._publish(self.config.success_topic, record)

    def _fail(
        self,
        key: str,
        status: int,
        message: str,
        kind: str,
        *,
        reason: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        record = self._records[key]
        if reason is None:
            reason = (
                f'ClientError: Received client error ({status}) from model with message "{message}"'
                if 400 <= status < 500
                else f"ClientError: Received server error ({status}) from model. See the "
                "SageMaker Endpoint logs in your account for more information."
            )
        # the training service's failure shape (JobError.to_dict), which its own fields fill in
        document = {
            "status": "failed",
            "code": status,
            "error": message,
            "type": kind,
            "inferenceId": record.inference_id,
            **(extra or {}),
        }
        try:
            write_json(self._s3, record.failure_location, document)
        except StorageError:
            log.exception("%s: cannot write %s", self.config.name, record.failure_location)
        record = self._update(key, status=FAILED, failure_reason=reason, finished=time.monotonic())
        self._publish(self.config.error_topic, record)

    def _publish(self, topic: str | None, record: Invocation) -> None:
        if not topic:
            return
        failed = record.status == FAILED
        message = build_notification(
            region=self.config.region,
            endpoint=self.config.name,
            inference_id=record.inference_id,
            input_location=record.input_location,
            received=record.received,
            input_content_type=record.content_type,
            accept=record.accept,
            output_location=None if failed else record.output_location,
            failure_location=record.failure_location if failed else None,
            failure_reason=record.failure_reason if failed else None,
        )
        try:
            self._sns.publish(TopicArn=topic, Message=json.dumps(message))
        except Exception:  # the result is in S3 either way; a lost notification is logged
            log.exception("%s: cannot publish to %s", self.config.name, topic)


def _client_fault(exc: BaseException) -> bool:
    """The training service's JobError says whose fault it was; a ValueError is the caller's."""
    fault = getattr(exc, "client_fault", None)
    return bool(fault) if fault is not None else isinstance(exc, ValueError)
