"""The SNS notification of a SageMaker asynchronous invocation: one shape, written and read here.

A SageMaker async endpoint publishes one JSON message per finished invocation to its
SuccessTopic or ErrorTopic (AWS docs, "Check prediction results"; the shape below is the one
real endpoints send, as recorded in public samples)::

    {"awsRegion": "us-east-1", "eventTime": "...Z", "receivedTime": "...Z",
     "invocationStatus": "Completed",                     # or "Failed"
     "failureReason": "ClientError: ...",                 # Failed only
     "requestParameters": {"contentType": ..., "endpointName": ..., "inputLocation": "s3://..."},
     "responseParameters": {"contentType": ..., "outputLocation": "s3://....out"},
     "inferenceId": "...", "eventVersion": "1.0", "eventSource": "aws:sagemaker",
     "eventName": "InferenceResult"}

Since S3FailurePath exists (2023) a failure's ``responseParameters`` carries
``failureLocation``; the reader accepts it missing (the client also knows the location from
``InvokeEndpointAsync``'s answer). Delivered through an SQS subscription the message is wrapped
in SNS's envelope (``{"Type": "Notification", "Message": "<the JSON above>", ...}``) unless
the subscription sets RawMessageDelivery; :func:`parse_notification` reads both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..errors import AvatarforgeError

COMPLETED = "Completed"
FAILED = "Failed"


class NotificationError(AvatarforgeError, ValueError):
    """A message is not an async-inference notification; the message says what was wrong."""

    status = 400


@dataclass(frozen=True)
class Notification:
    """What a reader needs from one notification."""

    inference_id: str
    status: str  # COMPLETED or FAILED
    output_location: str | None
    failure_location: str | None
    failure_reason: str | None
    raw: dict[str, Any]

    @property
    def succeeded(self) -> bool:
        return self.status == COMPLETED


def timestamp(when: datetime | None = None) -> str:
    """``2023-05-23T03:23:21.814Z``: the format of eventTime and receivedTime."""
    when = (when or datetime.now(UTC)).astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def build_notification(
    *,
    region: str,
    endpoint: str,
    inference_id: str,
    input_location: str,
    received: datetime,
    input_content_type: str | None,
    output_location: str | None = None,
    failure_location: str | None = None,
    failure_reason: str | None = None,
    output_content_type: str = "application/json",
    accept: str | None = None,
) -> dict[str, Any]:
    """The message a real endpoint publishes: success when ``failure_reason`` is None."""
    request: dict[str, Any] = {}
    if accept:
        request["accept"] = accept
    if input_content_type:
        request["contentType"] = input_content_type
    request.update(endpointName=endpoint, inputLocation=input_location)
    message: dict[str, Any] = {
        "awsRegion": region,
        "eventTime": timestamp(),
        "receivedTime": timestamp(received),
        "invocationStatus": COMPLETED if failure_reason is None else FAILED,
    }
    if failure_reason is None:
        response = {"contentType": output_content_type, "outputLocation": output_location}
    else:
        message["failureReason"] = failure_reason
        response = {"contentType": "application/json", "failureLocation": failure_location}
    message.update(
        requestParameters=request,
        responseParameters=response,
        inferenceId=inference_id,
        eventVersion="1.0",
        eventSource="aws:sagemaker",
        eventName="InferenceResult",
    )
    return message


def parse_notification(text: str | bytes) -> Notification:
    """An SQS message body (SNS envelope or raw delivery) or an SNS message -> Notification."""
    data = _json_object(text, "message")
    if data.get("Type") == "Notification" and isinstance(data.get("Message"), str):
        data = _json_object(data["Message"], "SNS envelope's Message")
    if data.get("eventName") != "InferenceResult" or data.get("eventSource") != "aws:sagemaker":
        raise NotificationError(
            "not a SageMaker async-inference notification "
            f"(eventSource={data.get('eventSource')!r}, eventName={data.get('eventName')!r})"
        )
    status = data.get("invocationStatus")
    inference_id = data.get("inferenceId")
    if status not in (COMPLETED, FAILED) or not isinstance(inference_id, str):
        raise NotificationError(
            f"notification without a known invocationStatus/inferenceId: "
            f"{status!r}/{inference_id!r}"
        )
    response = data.get("responseParameters") or {}
    return Notification(
        inference_id=inference_id,
        status=status,
        output_location=response.get("outputLocation"),
        failure_location=response.get("failureLocation"),
        failure_reason=data.get("failureReason"),
        raw=data,
    )


def _json_object(text: str | bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotificationError(f"{what} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise NotificationError(f"{what} is not a JSON object")
    return data
