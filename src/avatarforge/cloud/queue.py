"""Async-inference notifications through SQS: a queue subscribed to the endpoint's SNS topics.

SNS pushes each notification to every subscribed queue; a client long-polls its queue instead
of polling S3. Notifications of other jobs stay in the queue (they become visible again after a
short visibility timeout), so many clients can share one queue; a notification is deleted only
by the client that was waiting for it. S3 stays the record: a deleted or lost notification
never loses a result.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .notifications import Notification, NotificationError, parse_notification

_OTHERS_HIDDEN_S = 2  # how long a notification of another job is hidden from other readers


def topic_arn(sns: Any, name: str) -> str | None:
    """The ARN of the SNS topic called ``name``, or None."""
    for page in sns.get_paginator("list_topics").paginate():
        for topic in page.get("Topics", []):
            if topic["TopicArn"].rsplit(":", 1)[-1] == name:
                return topic["TopicArn"]
    return None


def subscribe_queue(sns: Any, sqs: Any, queue_name: str, topic_arns: list[str]) -> str:
    """Create (or reuse) the SQS queue ``queue_name``, let the topics send to it, subscribe it to
    each; returns its URL. Idempotent."""
    url = sqs.create_queue(QueueName=queue_name)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "async-inference-notifications",
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": list(topic_arns)}},
            }
        ],
    }
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(policy)})
    for topic in topic_arns:
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)
    return url


def wait_for_notification(
    sqs: Any, queue_url: str, inference_id: str, timeout: float
) -> Notification | None:
    """Long-poll ``queue_url`` up to ``timeout`` seconds for the notification of
    ``inference_id``; deletes and returns it, or returns None."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        answer = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=max(0, min(20, int(left))),
            VisibilityTimeout=_OTHERS_HIDDEN_S,
        )
        for message in answer.get("Messages", []):
            try:
                note = parse_notification(message["Body"])
            except NotificationError:
                continue  # not ours to judge: someone else's message in a shared queue
            if note.inference_id == inference_id:
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
                return note
        if left < 1:  # that was the last (short) poll
            return None
