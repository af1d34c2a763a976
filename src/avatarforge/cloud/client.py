"""The client of a deployed avatarforge: submit a training job, read its status, generate.

Plain functions over a :class:`~avatarforge.deploy.config.DeployConfig` (bucket, prefixes,
endpoint names, region) and a boto3 session (default: a new one, which reads credentials,
``AWS_ENDPOINT_URL`` and ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME`` from the environment):

- :func:`submit` uploads a photo folder (or references an ``s3://`` prefix), writes the
  training request to ``jobs/<job_id>/request.json``, invokes the async training endpoint and
  records its answer in ``jobs/<job_id>/submission.json``, so :func:`status` works from any
  machine that can read the bucket.
- :func:`status` reads the job's output or failure object (the locations the endpoint gave at
  submit), optionally waiting on an SQS queue subscribed to the endpoint's SNS topics.
- :func:`generate` invokes the multi-model endpoint with ``TargetModel=<user>.tar.gz`` and the
  serving schema's KServe JSON, and returns the JPEG bytes the server sent.

Nothing here prints; errors are :class:`CloudError` subclasses whose messages say what to do.
"""

from __future__ import annotations

import json
import mimetypes
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..deploy.config import DeployConfig
from ..errors import AvatarforgeError
from ..mme.front import MAX_BODY_BYTES
from ..names import check_job_id, check_user_id
from ..storage import ObjectNotFoundError, StorageError, parse_s3_uri
from .notifications import Notification
from .photos import PhotoLimits, local_photos
from .queue import wait_for_notification
from .s3 import object_exists, read_json, read_object, write_json

PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"


class CloudError(AvatarforgeError, RuntimeError):
    """Base of the client's errors."""


class EndpointError(CloudError):
    """An endpoint answered with an error; ``code`` is SageMaker's (e.g. ValidationError)."""

    def __init__(self, message: str, code: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        if status is not None:  # else the class's: ours (500)
            self.status = status


class UnknownJobError(CloudError, LookupError):
    """No submission is recorded for that job id."""

    status = 404


class NoModelError(CloudError, LookupError):
    """The user has no ``<user>.tar.gz`` under the models prefix yet."""

    status = 404


class RequestTooLargeError(CloudError, ValueError):
    """The request body is over SageMaker's 6 MB real-time limit (refused before sending)."""

    status = 413


class ResponseError(CloudError):
    """The endpoint answered 200 with something that is not the expected response."""

    status = 502


# ---------------------------------------------------------------------------------- submit


@dataclass(frozen=True)
class Submission:
    """What submit did: where the job's request is and where its result will be."""

    job_id: str
    user: str
    inference_id: str
    endpoint: str
    photos: str  # the s3:// prefix the job reads
    input_location: str  # the request JSON (the async invocation's InputLocation)
    output_location: str  # the endpoint's OutputLocation: the result JSON on success
    failure_location: str  # the endpoint's FailureLocation: the error on failure
    submitted_at: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Submission:
        return cls(**{k: str(data[k]) for k in cls.__dataclass_fields__})


def new_job_id(user: str) -> str:
    """``<user>-<UTC time>-<4 hex>``: sortable, readable, unique enough, a valid job id."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return check_job_id(f"{user[:40]}-{stamp}-{secrets.token_hex(2)}")


def job_uri(config: DeployConfig, job_id: str, name: str) -> str:
    """``<jobs prefix><job_id>/<name>``: where the client keeps a job's documents."""
    return f"{config.jobs_prefix}{job_id}/{name}"


def submit(
    config: DeployConfig,
    user: str,
    photos: str | Path,
    *,
    job_id: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    session: Any = None,
    limits: PhotoLimits | None = None,
) -> Submission:
    """Upload ``photos`` (a local folder; an ``s3://`` prefix is referenced, not copied), write
    the training request and invoke the async training endpoint.

    ``overrides``: ``{"train": {...}, "preprocess": {...}}`` (the service checks their bounds).
    Re-submitting a job id resumes that job (the service's rule).
    """
    check_user_id(user)
    job_id = check_job_id(job_id) if job_id else new_job_id(user)
    overrides = _check_overrides(overrides or {})
    session = _session(session)
    s3 = session.client("s3", region_name=config.region)
    source = str(photos)
    if source.startswith("s3://"):
        parse_s3_uri(source)  # a bucket and a key prefix, or a clear ValueError
        photos_uri = source if source.endswith("/") else source + "/"
    else:
        files = local_photos(Path(source), limits)  # checked before any upload
        photos_uri = f"{config.photos_prefix}{user}/{job_id}/"
        _upload(s3, files, photos_uri)
    request = {
        "job_id": job_id,
        "user": user,
        "photos": photos_uri,
        "models_prefix": config.models_prefix,
        "work_prefix": config.jobs_prefix,  # the job's checkpoint and result beside these
        **overrides,
    }
    input_location = write_json(s3, job_uri(config, job_id, "request.json"), request)
    runtime = runtime_client(session, config.region)
    try:
        answer = runtime.invoke_endpoint_async(
            EndpointName=config.training_endpoint_name,
            InputLocation=input_location,
            InferenceId=job_id,
            ContentType="application/json",
            Accept="application/json",
            InvocationTimeoutSeconds=config.training_timeout_s,
            # a job that cannot start within this fails (ErrorTopic) instead of waiting 6 h
            RequestTTLSeconds=config.training_request_ttl_s,
        )
    except Exception as exc:
        raise _endpoint_error(exc, config.training_endpoint_name, "make deploy-training") from exc
    submission = Submission(
        job_id=job_id,
        user=user,
        inference_id=answer.get("InferenceId") or job_id,
        endpoint=config.training_endpoint_name,
        photos=photos_uri,
        input_location=input_location,
        output_location=answer["OutputLocation"],
        failure_location=answer.get("FailureLocation") or "",
        submitted_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_json(s3, job_uri(config, job_id, "submission.json"), submission.to_dict())
    return submission


def _check_overrides(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    unknown = sorted(set(overrides) - {"train", "preprocess"})
    if unknown:
        raise ValueError(f"overrides: unknown section(s) {', '.join(unknown)} (train, preprocess)")
    for name, values in overrides.items():
        if not isinstance(values, dict):
            raise ValueError(f"overrides.{name}: must be an object of settings")
    return {k: dict(v) for k, v in overrides.items() if v}


def _upload(s3: Any, files: list[Path], prefix: str) -> None:
    target = parse_s3_uri(prefix + "x")
    key_prefix = target.key[:-1]
    from botocore.exceptions import BotoCoreError, ClientError

    for path in files:
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        try:
            s3.upload_file(
                str(path), target.bucket, key_prefix + path.name, ExtraArgs={"ContentType": ctype}
            )
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"upload of {path} to {prefix} failed: {exc}") from exc


# ---------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class JobStatus:
    """A job's state: pending, succeeded (with the result) or failed (with the reason)."""

    job_id: str
    state: str
    submission: Submission
    result: dict[str, Any] | None = None  # the service's result JSON (succeeded)
    reason: str | None = None  # why it failed
    failure: dict[str, Any] | None = None  # the failure document, when one was readable
    source: str = "s3"  # where the answer came from: s3 or sqs

    @property
    def done(self) -> bool:
        return self.state != PENDING


def status(
    config: DeployConfig,
    job_id: str,
    *,
    wait: float = 0.0,
    queue_url: str | None = None,
    poll_s: float = 5.0,
    session: Any = None,
) -> JobStatus:
    """The job's state now, or after waiting up to ``wait`` seconds for it to end: on the SQS
    queue ``queue_url`` (subscribed to the endpoint's topics) when given, else polling S3."""
    check_job_id(job_id)
    session = _session(session)
    s3 = session.client("s3", region_name=config.region)
    sqs = session.client("sqs", region_name=config.region) if queue_url else None
    submission = _load_submission(s3, config, job_id)
    deadline = time.monotonic() + wait
    while True:
        found = _from_s3(s3, submission)
        left = deadline - time.monotonic()
        if found.done or left <= 0:
            return found
        if sqs is not None and queue_url:
            # in slices: S3 is looked at again between them, in case a notification is lost
            note = wait_for_notification(sqs, queue_url, submission.inference_id, min(left, 20))
            if note is not None:
                return _from_notification(s3, submission, note)
        else:
            time.sleep(min(poll_s, left))


def _load_submission(s3: Any, config: DeployConfig, job_id: str) -> Submission:
    uri = job_uri(config, job_id, "submission.json")
    try:
        return Submission.from_dict(read_json(s3, uri))
    except ObjectNotFoundError:
        raise UnknownJobError(
            f"no job {job_id!r}: nothing at {uri} (was it submitted to this bucket and prefix?)"
        ) from None
    except (KeyError, TypeError) as exc:
        raise CloudError(f"{uri}: not a submission record ({exc})") from None


def _from_s3(s3: Any, submission: Submission) -> JobStatus:
    try:
        return _succeeded(s3, submission, submission.output_location, "s3")
    except ObjectNotFoundError:
        pass
    if submission.failure_location:
        try:
            return _failed(s3, submission, submission.failure_location, None, "s3")
        except ObjectNotFoundError:
            pass
    return JobStatus(submission.job_id, PENDING, submission)


def _from_notification(s3: Any, submission: Submission, note: Notification) -> JobStatus:
    if note.succeeded:
        return _succeeded(s3, submission, note.output_location or submission.output_location, "sqs")
    location = note.failure_location or submission.failure_location
    try:
        return _failed(s3, submission, location, note.failure_reason, "sqs")
    except ObjectNotFoundError:  # the notification alone still says it failed, and why
        reason = note.failure_reason or "failed (no reason given)"
        return JobStatus(submission.job_id, FAILED, submission, reason=reason, source="sqs")


def _succeeded(s3: Any, submission: Submission, location: str, source: str) -> JobStatus:
    body = read_object(s3, location)  # ObjectNotFoundError: not (yet) there
    try:
        result = json.loads(body)
    except ValueError:
        result = None
    if not isinstance(result, dict) or result.get("status") != SUCCEEDED:
        # a success is only what says so: anything else at the output location is a failure
        shown = body[:200].decode(errors="replace")
        reason = f"the output at {location} is not a successful result: {shown}"
        return JobStatus(submission.job_id, FAILED, submission, reason=reason, source=source)
    return JobStatus(submission.job_id, SUCCEEDED, submission, result=result, source=source)


def _failed(
    s3: Any, submission: Submission, location: str, reason: str | None, source: str
) -> JobStatus:
    body = read_object(s3, location)  # ObjectNotFoundError: not there
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict):
        message = document.get("error") or document.get("message") or reason
    else:
        message = body[:500].decode(errors="replace").strip() or reason
        document = None
    return JobStatus(
        submission.job_id,
        FAILED,
        submission,
        reason=str(message or "failed (no reason given)"),
        failure=document,
        source=source,
    )


# ---------------------------------------------------------------------------------- generate


@dataclass(frozen=True)
class RetryPolicy:
    """How generate rides out a busy or loading endpoint.

    Throttling and 5xx answers are retried by botocore (``mode``, ``max_attempts``);
    ModelNotReadyException — SageMaker's answer while a TargetModel loads on its first request
    — and a model's "send it again" (``_retry_reason``) are retried here with exponential backoff
    and jitter for up to ``model_loading_s``.
    """

    mode: str = "adaptive"  # botocore retry mode: standard or adaptive (client-side rate limit)
    max_attempts: int = 5
    model_loading_s: float = 180.0
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    read_timeout_s: float = 70.0  # SageMaker answers within 60 s


def runtime_client(session: Any, region: str, retry: RetryPolicy | None = None) -> Any:
    """A sagemaker-runtime client with botocore's retries and a timeout above SageMaker's."""
    from botocore.config import Config

    retry = retry or RetryPolicy()
    config = Config(
        retries={"mode": retry.mode, "max_attempts": retry.max_attempts},
        read_timeout=retry.read_timeout_s,
        connect_timeout=10,
    )
    return session.client("sagemaker-runtime", region_name=region, config=config)


def generate(
    target: DeployConfig | str,
    user: str,
    prompt: str,
    negative_prompt: str | None = None,
    gen_args: str | dict[str, Any] | None = None,
    *,
    region: str | None = None,
    models_prefix: str | None = None,
    retry: RetryPolicy | None = None,
    session: Any = None,
    on_retry: Callable[[str, float], None] | None = None,
) -> list[bytes]:
    """JPEG bytes, one per image, exactly as the endpoint sent them (base64-decoded only).

    ``target``: a DeployConfig (its MME endpoint, region and models prefix) or an endpoint
    name (then ``region``; ``models_prefix`` lets a missing model be told apart). ``on_retry``
    hears ``(reason, seconds)`` before each wait for a loading model.
    """
    from ..generate import GenArgs
    from ..mme.generate import generate_request

    check_user_id(user)
    if isinstance(target, DeployConfig):
        endpoint, region = target.mme_endpoint_name, region or target.region
        if models_prefix is None and target.bucket:
            models_prefix = target.models_prefix
    else:
        endpoint = target
    if gen_args is not None:
        GenArgs.parse(gen_args)  # a bad field is named here, not by a remote error
    body = json.dumps(generate_request(prompt, negative_prompt, gen_args)).encode()
    if len(body) > MAX_BODY_BYTES:
        raise RequestTooLargeError(
            f"request body of {len(body)} bytes is over SageMaker's real-time limit of "
            f"{MAX_BODY_BYTES} bytes (6 MB): shorten the prompt"
        )
    retry = retry or RetryPolicy()
    session = _session(session)
    runtime = runtime_client(session, region or session.region_name, retry)
    target_model = f"{user}.tar.gz"
    deadline = time.monotonic() + retry.model_loading_s
    attempt = 0
    while True:
        try:
            answer = runtime.invoke_endpoint(
                EndpointName=endpoint,
                TargetModel=target_model,
                ContentType="application/json",
                Accept="application/json",
                Body=body,
            )
            break
        except Exception as exc:
            code = _error_code(exc)
            left = deadline - time.monotonic()
            if (reason := _retry_reason(exc, code)) and left > 0:
                pause = min(left, _backoff(attempt, retry))
                if on_retry:
                    on_retry(f"{target_model} on {endpoint}: {reason}", pause)
                time.sleep(pause)
                attempt += 1
                continue
            if code in ("ValidationError", "ModelError") and models_prefix:
                _raise_if_no_model(session, region, models_prefix, user, exc)
            raise _endpoint_error(exc, endpoint, "make deploy-mme") from exc
    return jpegs_from_response(answer["Body"].read())


def _retry_reason(exc: BaseException, code: str) -> str:
    """Why the same request may succeed later ("" if it will not): the TargetModel is loading
    (429 ModelNotReadyException), the endpoint asks for a retry (503 ServiceUnavailable, after
    botocore's own attempts), or the model answered an error starting ``RETRY_PREFIX`` — which
    SageMaker hands over inside a 424 ModelError: Triton's SageMaker front end answers every
    model error 400, and OriginalMessage is its body, ``{"error": "unavailable: ..."}``. Never
    another error: a 400 means the request must change."""
    from ..serving.bootstrap import RETRY_PREFIX

    if code == "ModelNotReadyException":
        return "the model is loading"
    if code == "ServiceUnavailable":
        return "the endpoint is busy"
    if code != "ModelError":
        return ""
    response = getattr(exc, "response", None)
    original = str(response.get("OriginalMessage") or "") if isinstance(response, dict) else ""
    try:
        parsed = json.loads(original)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        original = parsed["error"]
    return original if original.startswith(RETRY_PREFIX) else ""


def _backoff(attempt: int, retry: RetryPolicy) -> float:
    """Exponential backoff with jitter (a fleet of clients must not retry in step)."""
    ceiling = min(retry.backoff_max_s, retry.backoff_s * 2**attempt)
    return random.uniform(ceiling / 2, ceiling)


def _raise_if_no_model(
    session: Any, region: str | None, models_prefix: str, user: str, exc: BaseException
) -> None:
    uri = f"{models_prefix.rstrip('/')}/{user}.tar.gz"
    s3 = session.client("s3", region_name=region)
    try:
        exists = object_exists(s3, uri)
    except StorageError:
        return  # cannot tell: the endpoint's own error is the better message
    if not exists:
        raise NoModelError(
            f"user {user!r} has no model yet (nothing at {uri}): submit a training job first "
            f"(avatarforge submit --user {user} --photos DIR) and wait until it succeeds "
            f"(avatarforge status JOB --wait 3600)"
        ) from exc


def jpegs_from_response(body: bytes) -> list[bytes]:
    """The ``generated_image`` output of a KServe v2 JSON response, base64-decoded."""
    from ..serving import schema

    try:
        data = json.loads(body)
        outputs = data["outputs"]
        output = next(o for o in outputs if o.get("name") == schema.GENERATED_IMAGE.name)
        texts = output["data"]
    except (ValueError, KeyError, TypeError, StopIteration):
        shown = body[:200].decode(errors="replace")
        raise ResponseError(
            f"response has no {schema.GENERATED_IMAGE.name!r} output: {shown}"
        ) from None
    import numpy as np

    from ..serving.client import ServingError, decode_jpegs

    try:  # one row: the images of one prompt, checked as the Triton client checks them
        images = decode_jpegs(np.array([list(texts)], dtype=object))[0] if texts else []
    except ServingError as exc:
        raise ResponseError(f"the response's {exc}") from None
    if not images:
        raise ResponseError("the response holds no image")
    return images


# ---------------------------------------------------------------------------------- helpers


def _session(session: Any) -> Any:
    if session is not None:
        return session
    import boto3

    return boto3.session.Session()


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _endpoint_error(exc: BaseException, endpoint: str, deploy_hint: str) -> CloudError:
    """A botocore error as an :class:`EndpointError` that names the endpoint."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code, message = str(error.get("Code", "")), str(error.get("Message", "")) or str(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "ValidationError" and f"Endpoint {endpoint} of account" in message:
            message += f" (is it deployed? {deploy_hint})"
        return EndpointError(f"{endpoint}: {code}: {message}", code, status)
    if isinstance(exc, BotoCoreError):
        return EndpointError(f"{endpoint}: {exc}")
    if isinstance(exc, CloudError):
        return exc
    return EndpointError(f"{endpoint}: {type(exc).__name__}: {exc}")
