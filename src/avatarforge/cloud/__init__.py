"""avatarforge as a cloud service: the client of a deployment, and the same service locally.

- :mod:`.client`         submit a training job, read its status, generate (boto3)
- :mod:`.photos`         a local photo folder checked against the service's limits
- :mod:`.notifications`  the async-inference SNS notification JSON (written and read)
- :mod:`.queue`          an SQS queue subscribed to the training endpoint's topics
- :mod:`.s3`             small JSON/bytes objects by URI
- :mod:`.async_runner`   a local async endpoint: S3 in, bounded workers, S3 + SNS out
- :mod:`.local_runtime`  a local SageMaker runtime HTTP API (InvokeEndpoint, InvokeEndpointAsync)

The client talks to real AWS and to the local pieces alike: only boto3's endpoints differ.
"""

from .client import (
    CloudError,
    EndpointError,
    JobStatus,
    NoModelError,
    RequestTooLargeError,
    ResponseError,
    RetryPolicy,
    Submission,
    UnknownJobError,
    generate,
    status,
    submit,
)
from .photos import PhotoError, PhotoLimits

__all__ = [
    "CloudError",
    "EndpointError",
    "JobStatus",
    "NoModelError",
    "PhotoError",
    "PhotoLimits",
    "RequestTooLargeError",
    "ResponseError",
    "RetryPolicy",
    "Submission",
    "UnknownJobError",
    "generate",
    "status",
    "submit",
]
