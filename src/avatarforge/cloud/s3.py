"""Small objects in S3 by URI: the JSON documents of jobs (requests, submissions, results).

:mod:`avatarforge.storage` moves files; these read and write bytes, which is what the cloud
client and the async runner exchange. ``client`` is a boto3 S3 client (its endpoint, region and
credentials are the caller's choice).
"""

from __future__ import annotations

import json
from typing import Any

from ..storage import ObjectNotFoundError, StorageError, parse_s3_uri

_MISSING = ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def read_object(client: Any, uri: str) -> bytes:
    """The bytes at ``uri``; :class:`ObjectNotFoundError` if there is no such object."""
    from botocore.exceptions import BotoCoreError, ClientError

    target = parse_s3_uri(uri)
    try:
        return client.get_object(Bucket=target.bucket, Key=target.key)["Body"].read()
    except ClientError as exc:
        if _code(exc) in _MISSING:
            raise ObjectNotFoundError(f"{uri}: no such object") from exc
        raise StorageError(f"{uri}: read failed: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"{uri}: read failed: {exc}") from exc


def read_json(client: Any, uri: str) -> Any:
    data = read_object(client, uri)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StorageError(f"{uri}: not JSON ({exc})") from None


def write_object(
    client: Any, uri: str, data: bytes, content_type: str = "application/octet-stream"
) -> str:
    """One PUT: the object appears whole or not at all. Returns ``uri``."""
    from botocore.exceptions import BotoCoreError, ClientError

    target = parse_s3_uri(uri)
    try:
        client.put_object(Bucket=target.bucket, Key=target.key, Body=data, ContentType=content_type)
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"{uri}: write failed: {exc}") from exc
    return uri


def write_json(client: Any, uri: str, data: Any) -> str:
    body = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    return write_object(client, uri, body, "application/json")


def object_exists(client: Any, uri: str) -> bool:
    """HeadObject: True if it exists, False if S3 says 404; other errors raise StorageError."""
    from botocore.exceptions import BotoCoreError, ClientError

    target = parse_s3_uri(uri)
    try:
        client.head_object(Bucket=target.bucket, Key=target.key)
    except ClientError as exc:
        if _code(exc) in _MISSING:
            return False
        raise StorageError(f"{uri}: HeadObject failed: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"{uri}: HeadObject failed: {exc}") from exc
    return True


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
