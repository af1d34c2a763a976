"""The cloud client (submit, status) and the local async endpoint, against a real moto server
(S3, SNS -> SQS) and the local SageMaker runtime, through boto3's own sagemaker-runtime client.

The handlers here stand in for the training service (any ``(body, content_type) -> bytes``
function); the real one runs in tests/test_cloud_e2e.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import boto3
import pytest
from fixtures.cloud import json_bytes, result_for

from avatarforge.cloud import (
    EndpointError,
    PhotoError,
    PhotoLimits,
    RequestTooLargeError,
    UnknownJobError,
    generate,
    status,
    submit,
)
from avatarforge.cloud.client import job_uri
from avatarforge.cloud.notifications import (
    NotificationError,
    build_notification,
    parse_notification,
)
from avatarforge.cloud.photos import local_photos
from avatarforge.cloud.queue import subscribe_queue
from avatarforge.cloud.s3 import read_json, read_object, write_object
from avatarforge.storage import parse_s3_uri


class FakeJobError(Exception):
    """The training service's error contract: whose fault, and the HTTP status."""

    def __init__(self, message: str, *, client_fault: bool, status: int) -> None:
        super().__init__(message)
        self.client_fault = client_fault
        self.status = status


def succeed(body: bytes, content_type: str | None) -> bytes:
    return json_bytes(result_for(json.loads(body)))


def no_faces(body: bytes, content_type: str | None) -> bytes:
    raise FakeJobError("no usable face in 9 photos: a.jpg: no face", client_fault=True, status=400)


def photos(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"selfie-{i}.jpg").write_bytes(b"\xff\xd8\xff" + bytes([i]) * 100)
    (folder / ".DS_Store").write_bytes(b"hidden")
    return folder


def keys(bucket: str, prefix: str = "") -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def drain(queue_url: str) -> list[dict]:
    """Every message in the queue: the SNS envelopes as SQS delivers them."""
    sqs, out = boto3.client("sqs"), []
    while True:
        got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        if not got.get("Messages"):
            return out
        for message in got["Messages"]:
            out.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])


# ------------------------------------------------------------------------------ unit tests


def test_notification_shape_and_envelope_round_trip() -> None:
    from datetime import UTC, datetime

    received = datetime(2026, 11, 27, 10, 0, 0, 123000, tzinfo=UTC)
    ok = build_notification(
        region="eu-west-1",
        endpoint="af-training",
        inference_id="job-1",
        input_location="s3://b/jobs/job-1/request.json",
        received=received,
        input_content_type="application/json",
        output_location="s3://b/async/out/u.out",
    )
    assert ok["invocationStatus"] == "Completed" and "failureReason" not in ok
    assert ok["receivedTime"] == "2026-11-27T10:00:00.123Z"
    assert ok["requestParameters"] == {
        "contentType": "application/json",
        "endpointName": "af-training",
        "inputLocation": "s3://b/jobs/job-1/request.json",
    }
    assert ok["responseParameters"]["outputLocation"] == "s3://b/async/out/u.out"
    assert (ok["eventSource"], ok["eventName"], ok["eventVersion"]) == (
        "aws:sagemaker",
        "InferenceResult",
        "1.0",
    )
    envelope = json.dumps({"Type": "Notification", "Message": json.dumps(ok)})
    note = parse_notification(envelope)
    assert (note.inference_id, note.succeeded, note.output_location) == (
        "job-1",
        True,
        "s3://b/async/out/u.out",
    )

    bad = build_notification(
        region="eu-west-1",
        endpoint="af-training",
        inference_id="job-2",
        input_location="s3://b/in",
        received=received,
        input_content_type=None,
        failure_location="s3://b/async/failed/u-error.out",
        failure_reason="ClientError: boom",
    )
    note = parse_notification(json.dumps(bad))  # raw delivery: no envelope
    assert not note.succeeded and note.failure_reason == "ClientError: boom"
    assert note.failure_location == "s3://b/async/failed/u-error.out"
    assert "contentType" not in bad["requestParameters"]
    for junk in ("[]", "not json", json.dumps({"Type": "Notification", "Message": "{}"})):
        with pytest.raises(NotificationError):
            parse_notification(junk)


def test_local_photos_are_checked_before_upload(tmp_path: Path) -> None:
    folder = photos(tmp_path / "p", 3)
    assert [p.name for p in local_photos(folder)] == [f"selfie-{i}.jpg" for i in range(3)]
    with pytest.raises(PhotoError, match="4 files .* more than the limit of 3"):
        (folder / "extra.png").write_bytes(b"x")
        local_photos(folder, PhotoLimits(max_photos=3))
    with pytest.raises(PhotoError, match="selfie-0.jpg is .* MiB per photo"):
        local_photos(folder, PhotoLimits(max_photo_bytes=50))
    with pytest.raises(PhotoError, match="in all"):
        local_photos(folder, PhotoLimits(max_total_bytes=200))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PhotoError, match="no files"):
        local_photos(tmp_path / "empty")
    with pytest.raises(PhotoError, match="not a folder"):
        local_photos(tmp_path / "missing")


def test_mme_errors_are_answered_as_sagemaker_errors() -> None:
    from avatarforge.mme.front import reply_for
    from avatarforge.mme.loader import (
        InvalidTargetModelError,
        InvokeError,
        ModelLoadError,
        UnknownTargetModelError,
    )

    def answer(exc: BaseException) -> tuple[int, str, dict]:
        reply = reply_for(exc)
        return reply.status, dict(reply.headers)["x-amzn-ErrorType"], json.loads(reply.body)

    status_, code, body = answer(UnknownTargetModelError("TargetModel 'x.tar.gz' not found"))
    assert (status_, code) == (404, "ValidationError")
    assert body["message"].startswith("Failed to download model data") and body["error"]
    assert answer(InvalidTargetModelError("bad"))[:2] == (400, "ValidationError")
    status_, code, body = answer(ModelLoadError("Triton could not load"))
    assert (status_, code, body["OriginalStatusCode"]) == (424, "ModelError", 500)
    status_, code, body = answer(InvokeError("input 'prompt' missing", 400))
    assert (status_, code, body["OriginalStatusCode"]) == (400, "ModelError", 400)
    assert body["message"].startswith("Received client error (400) from model")
    # no answer in time: SageMaker's ModelError, which clients do not retry (a 5xx would be)
    assert answer(TimeoutError("timed out"))[:2] == (424, "ModelError")
    assert answer(RuntimeError("boom"))[:2] == (500, "InternalFailure")


# ------------------------------------------------------------------------------ integration


@pytest.mark.integration
def test_submit_uploads_writes_the_request_and_invokes(
    cloud_config, start_runtime, tmp_path: Path
) -> None:
    seen: list[tuple[bytes, str | None]] = []

    def handler(body: bytes, content_type: str | None) -> bytes:
        seen.append((body, content_type))
        return succeed(body, content_type)

    _, runner = start_runtime(handler)
    folder = photos(tmp_path / "selfies", 3)
    sub = submit(
        cloud_config, "alice", folder, job_id="alice-1", overrides={"train": {"steps": 50}}
    )
    bucket = cloud_config.bucket
    assert keys(bucket, "avatarforge/photos/") == [
        f"avatarforge/photos/alice/alice-1/selfie-{i}.jpg" for i in range(3)
    ]  # the hidden file stays home
    s3 = boto3.client("s3")
    for i in range(3):
        uploaded = read_object(s3, f"{cloud_config.photos_prefix}alice/alice-1/selfie-{i}.jpg")
        assert uploaded == (folder / f"selfie-{i}.jpg").read_bytes()
    request = read_json(s3, sub.input_location)
    assert sub.input_location == job_uri(cloud_config, "alice-1", "request.json")
    assert request == {
        "job_id": "alice-1",
        "user": "alice",
        "photos": f"s3://{bucket}/avatarforge/photos/alice/alice-1/",
        "models_prefix": f"s3://{bucket}/avatarforge/models/",
        "work_prefix": f"s3://{bucket}/avatarforge/jobs/",
        "train": {"steps": 50},
    }
    assert runner.wait_idle(10)
    (invocation,) = runner.history()
    # the runner read exactly the request submit wrote, as the endpoint was told
    assert invocation.input_location == sub.input_location
    assert invocation.inference_id == sub.inference_id == "alice-1"
    assert invocation.timeout_s == cloud_config.training_timeout_s
    assert seen == [(read_object(s3, sub.input_location), "application/json")]
    # the locations are the endpoint's (a uuid of its own), recorded for status elsewhere
    assert sub.output_location.startswith(cloud_config.async_output_prefix)
    assert sub.output_location.endswith(".out") and "alice-1" not in sub.output_location
    assert sub.failure_location == sub.output_location.replace(
        cloud_config.async_output_prefix, cloud_config.async_failure_prefix
    ).replace(".out", "-error.out")
    recorded = read_json(s3, job_uri(cloud_config, "alice-1", "submission.json"))
    assert recorded == sub.to_dict()

    done = status(cloud_config, "alice-1")
    assert done.state == "succeeded" and done.source == "s3"
    assert done.result == result_for(request)
    assert keys(bucket, "avatarforge/async/failed/") == []


@pytest.mark.integration
def test_submit_references_an_s3_prefix_and_refuses_bad_input_before_upload(
    cloud_config, start_runtime, tmp_path: Path
) -> None:
    _, runner = start_runtime(succeed)
    sub = submit(cloud_config, "bob", "s3://elsewhere/uploads/bob", job_id="bob-1")
    assert sub.photos == "s3://elsewhere/uploads/bob/"
    assert read_json(boto3.client("s3"), sub.input_location)["photos"] == sub.photos
    assert keys(cloud_config.bucket, "avatarforge/photos/") == []  # referenced, not copied

    before = keys(cloud_config.bucket)
    too_many = photos(tmp_path / "many", 5)
    with pytest.raises(PhotoError, match="more than the limit of 4"):
        submit(cloud_config, "carol", too_many, limits=PhotoLimits(max_photos=4))
    with pytest.raises(ValueError, match="not a valid user id"):
        submit(cloud_config, "../carol", too_many)
    with pytest.raises(ValueError, match="overrides: unknown section"):
        submit(cloud_config, "carol", too_many, overrides={"serve": {}})
    assert keys(cloud_config.bucket) == before  # nothing uploaded, nothing invoked
    assert runner.wait_idle(10) and len(runner.history()) == 1


@pytest.mark.integration
def test_status_reads_a_failure_from_s3_and_from_sqs(
    cloud_config, start_runtime, queue_url, tmp_path: Path
) -> None:
    release = threading.Event()

    def held_no_faces(body: bytes, content_type: str | None) -> bytes:
        release.wait(30)  # still running when status first looks: it waits on the queue
        return no_faces(body, content_type)

    _, runner = start_runtime(held_no_faces)
    sub = submit(cloud_config, "dave", photos(tmp_path / "p"), job_id="dave-1")
    assert status(cloud_config, "dave-1").state == "pending"
    # from the queue: the error topic's notification for this job, then its failure object.
    # The job ends 3 s after status starts waiting (a fixed 1.5 s job ended before status
    # first looked on a loaded machine, which then read S3)
    waited: list = []
    waiting = threading.Thread(
        target=lambda: waited.append(status(cloud_config, "dave-1", wait=20, queue_url=queue_url))
    )
    waiting.start()
    time.sleep(3)
    release.set()
    waiting.join(30)
    (found,) = waited
    assert found.state == "failed" and found.source == "sqs"
    assert drain(queue_url) == []  # the waiting client took its notification
    assert found.reason == "no usable face in 9 photos: a.jpg: no face"
    assert found.failure == {
        "status": "failed",
        "code": 400,
        "error": "no usable face in 9 photos: a.jpg: no face",
        "type": "FakeJobError",
        "inferenceId": "dave-1",
    }
    assert keys(cloud_config.bucket, "avatarforge/async/out/") == []
    # from S3 alone (another machine, no queue): the same answer
    again = status(cloud_config, "dave-1")
    assert (again.state, again.reason, again.source) == ("failed", found.reason, "s3")
    assert read_json(boto3.client("s3"), sub.failure_location) == found.failure
    with pytest.raises(UnknownJobError, match="no job 'nobody-1'"):
        status(cloud_config, "nobody-1")
    assert len(runner.history()) == 1


@pytest.mark.integration
def test_runner_publishes_the_documented_notification_to_the_right_topic(
    cloud_config, start_runtime, topics, tmp_path: Path
) -> None:
    sns, sqs = boto3.client("sns"), boto3.client("sqs")
    ok_queue = subscribe_queue(sns, sqs, "only-success", [topics[0]])
    bad_queue = subscribe_queue(sns, sqs, "only-errors", [topics[1]])

    def handler(body: bytes, content_type: str | None) -> bytes:
        if json.loads(body)["user"] == "erin":
            raise RuntimeError("CUDA out of memory")
        return succeed(body, content_type)

    _, runner = start_runtime(handler)
    good = submit(cloud_config, "frank", photos(tmp_path / "f"), job_id="frank-1")
    bad = submit(cloud_config, "erin", photos(tmp_path / "e"), job_id="erin-1")
    assert runner.wait_idle(10)
    (ok_envelope,) = drain(ok_queue)
    (bad_envelope,) = drain(bad_queue)
    assert ok_envelope["Type"] == "Notification" and ok_envelope["TopicArn"] == topics[0]
    ok = json.loads(ok_envelope["Message"])
    assert ok["invocationStatus"] == "Completed" and ok["inferenceId"] == "frank-1"
    assert ok["requestParameters"]["endpointName"] == cloud_config.training_endpoint_name
    assert ok["requestParameters"]["inputLocation"] == good.input_location
    assert ok["responseParameters"]["outputLocation"] == good.output_location
    assert ok["awsRegion"] == "us-east-1" and ok["eventSource"] == "aws:sagemaker"
    bad_note = json.loads(bad_envelope["Message"])
    assert bad_envelope["TopicArn"] == topics[1]
    assert bad_note["invocationStatus"] == "Failed" and bad_note["inferenceId"] == "erin-1"
    # a server-side fault: the reason is SageMaker's generic one, the details are in S3
    assert bad_note["failureReason"].startswith("ClientError: Received server error (500)")
    assert bad_note["responseParameters"]["failureLocation"] == bad.failure_location
    document = read_json(boto3.client("s3"), bad.failure_location)
    assert document["error"] == "CUDA out of memory" and document["code"] == 500
    assert status(cloud_config, "erin-1").reason == "CUDA out of memory"


@pytest.mark.integration
def test_at_most_n_run_at_once_and_the_rest_wait(
    cloud_config, start_runtime, s3_bucket: str
) -> None:
    release = threading.Semaphore(0)  # one finished job at a time: one slot frees at a time
    started: list[str] = []

    def slow(body: bytes, content_type: str | None) -> bytes:
        started.append(json.loads(body)["job_id"])
        release.acquire(timeout=30)
        return succeed(body, content_type)

    runtime, runner = start_runtime(slow, max_concurrent=2)
    client = boto3.client("sagemaker-runtime", endpoint_url=runtime.url)
    for i in range(5):
        uri = f"s3://{s3_bucket}/in/{i}.json"
        request = {"job_id": f"j{i}", "user": f"u{i}", "models_prefix": "s3://x/m/"}
        write_object(boto3.client("s3"), uri, json_bytes(request))
        answer = client.invoke_endpoint_async(
            EndpointName=cloud_config.training_endpoint_name, InputLocation=uri, InferenceId=f"j{i}"
        )
        assert answer["ResponseMetadata"]["HTTPStatusCode"] == 202
        assert answer["InferenceId"] == f"j{i}"
    try:
        deadline = time.monotonic() + 10
        while runner.running < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a third would have started by now if the bound did not hold
        states = [r.status for r in runner.history()]
        assert runner.running == 2 and sorted(started) == ["j0", "j1"]
        assert states == ["running", "running", "queued", "queued", "queued"]
    finally:
        for n in range(5):  # free one slot, then wait for the next queued job to take it
            release.release()
            deadline = time.monotonic() + 10
            while len(started) < min(5, n + 3) and time.monotonic() < deadline:
                time.sleep(0.02)
    assert runner.wait_idle(20)
    assert [r.status for r in runner.history()] == ["Completed"] * 5
    assert runner.max_running == 2 and started[2:] == ["j2", "j3", "j4"]  # arrival order


@pytest.mark.integration
def test_invocation_timeout_fails_the_job_and_bad_invocations_are_refused(
    cloud_config, start_runtime, s3_bucket: str
) -> None:
    def sleepy(body: bytes, content_type: str | None) -> bytes:
        time.sleep(2.5)
        return succeed(body, content_type)

    runtime, runner = start_runtime(sleepy)
    client = boto3.client("sagemaker-runtime", endpoint_url=runtime.url)
    uri = f"s3://{s3_bucket}/in/late.json"
    write_object(boto3.client("s3"), uri, json_bytes({"job_id": "late", "user": "u"}))
    answer = client.invoke_endpoint_async(
        EndpointName=cloud_config.training_endpoint_name,
        InputLocation=uri,
        InvocationTimeoutSeconds=1,
    )
    assert runner.wait_idle(10)
    (record,) = runner.history()
    assert record.status == "Failed" and "InvocationTimeoutSeconds=1" in record.failure_reason
    assert record.inference_id == answer["InferenceId"]  # one was made up, as SageMaker does
    failure = read_json(boto3.client("s3"), answer["FailureLocation"])
    assert failure["type"] == "InvocationTimeout"
    time.sleep(2)  # the late result is discarded: no output ever appears
    output = parse_s3_uri(answer["OutputLocation"])
    assert keys(output.bucket, "avatarforge/async/out/") == []

    with pytest.raises(client.exceptions.ValidationError, match="InvocationTimeoutSeconds"):
        client.invoke_endpoint_async(
            EndpointName=cloud_config.training_endpoint_name,
            InputLocation=uri,
            InvocationTimeoutSeconds=3601,
        )
    with pytest.raises(client.exceptions.ValidationError, match="Endpoint nope of account"):
        client.invoke_endpoint_async(EndpointName="nope", InputLocation=uri)
    # the client names the endpoint and says how to deploy it
    with pytest.raises(EndpointError, match="is it deployed"):
        submit(type(cloud_config)(name="other", bucket=cloud_config.bucket), "u", "s3://b/p/")


@pytest.mark.integration
def test_generate_refuses_a_body_over_6_mb_before_sending(cloud_config, start_runtime) -> None:
    runtime, _ = start_runtime(succeed)
    with pytest.raises(RequestTooLargeError, match="over SageMaker's real-time limit"):
        generate(cloud_config, "alice", "x" * (6 * 2**20 + 1))
    assert runtime.requests() == []


@pytest.mark.integration
def test_output_that_is_not_a_success_is_never_reported_as_one(
    cloud_config, start_runtime, tmp_path: Path
) -> None:
    def lies(body: bytes, content_type: str | None) -> bytes:
        return b'{"status": "Training Completed!"}'

    _, runner = start_runtime(lies)
    submit(cloud_config, "gina", photos(tmp_path / "g"), job_id="gina-1")
    assert runner.wait_idle(10)
    found = status(cloud_config, "gina-1")
    assert found.state == "failed" and "not a successful result" in found.reason
    assert found.result is None


@pytest.mark.integration
def test_a_failed_training_job_is_reported_with_the_services_reason(
    cloud_config, start_runtime, queue_url, tiny_base, tmp_path: Path
) -> None:
    from avatarforge.jobs import ServiceConfig, handle_invocation

    service = ServiceConfig(
        s3_prefix=cloud_config.s3(""),  # the deployment's, as deploy sets it
        work_dir=str(tmp_path / "work"),
        slots_dir=str(tmp_path / "slots"),
        shared_dir=str(tmp_path / "shared"),
    )

    def train(body: bytes, content_type: str | None) -> bytes:
        return handle_invocation(body, content_type, service)

    start_runtime(train)
    empty = f"s3://{cloud_config.bucket}/uploads/nobody/"  # no photos under it
    sub = submit(cloud_config, "hank", empty, job_id="hank-1")
    found = status(cloud_config, "hank-1", wait=60, queue_url=queue_url)
    assert found.state == "failed", found
    assert "uploads/nobody/" in found.reason  # not under photos/hank/: not the job's to read
    # the service's own failure document (JobError.to_dict), as the endpoint stored it
    assert found.failure["client_fault"] is True and 400 <= found.failure["code"] < 500
    assert found.failure["inferenceId"] == sub.inference_id
    assert keys(cloud_config.bucket, "avatarforge/models/") == []  # no model for a failure
