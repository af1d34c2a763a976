"""AWS access of deploy: boto3 clients of one session, the account, and error helpers.

Every call goes through boto3 clients made from one ``boto3.Session`` (region from the
deployment; endpoint, credentials and profile from the environment as boto3 reads them, so
``AWS_ENDPOINT_URL`` points everything at a local moto server in the tests). Reading what
exists is :mod:`.state`; carrying out a plan is :mod:`.apply`.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from ..errors import AvatarforgeError
from .config import DeployConfig


class DeployError(AvatarforgeError, RuntimeError):
    """An AWS step failed or cannot start; the message names the resource and what to do."""


class Clients:
    """boto3 clients of one session, made on first use."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self._made: dict[str, Any] = {}

    def __call__(self, service: str) -> Any:
        if service not in self._made:
            self._made[service] = self.session.client(service)
        return self._made[service]


def make_clients(config: DeployConfig) -> Clients:
    import boto3

    return Clients(boto3.Session(region_name=config.region))


def account_id(clients: Clients) -> str:
    """The caller's AWS account (STS); a clear error when there are no credentials."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        return clients("sts").get_caller_identity()["Account"]
    except NoCredentialsError:
        raise DeployError(
            "no AWS credentials found: configure them (aws configure, AWS_PROFILE or the "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY variables), or plan only with --dry-run"
        ) from None
    except (ClientError, BotoCoreError) as exc:
        raise DeployError(f"cannot reach AWS to identify the account: {exc}") from exc


# ---------------------------------------------------------------- errors and tags


def error_code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


def is_missing(exc: Exception) -> bool:
    """Is this ClientError the service's way of saying 'no such resource'?"""
    code = error_code(exc)
    message = str(exc)
    missing = {"404", "NoSuchBucket", "NoSuchKey", "NoSuchEntity", "NotFound", "NotFoundException"}
    return (
        code in missing
        or code == "ResourceNotFoundException"
        or (code in {"ValidationException", "ResourceNotFound"} and "Could not find" in message)
    )


def tag_dict(tags: list[dict[str, str]] | None) -> dict[str, str]:
    """Tags as a dict, from any service's list shape (Key/Value, key/value, KMS's TagKey)."""
    return {
        t.get("Key", t.get("key", t.get("TagKey"))): t.get(
            "Value", t.get("value", t.get("TagValue"))
        )
        for t in tags or []
    }


def policy_doc(value: Any) -> Any:
    # IAM returns policy documents URL-encoded; botocore decodes most, not all, of them
    if isinstance(value, str):
        return json.loads(urllib.parse.unquote(value))
    return value


def lifecycle_rules(s3: Any, bucket: str) -> list[dict]:
    """Every lifecycle rule of ``bucket`` ([] when it has none)."""
    try:
        return s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    except Exception as exc:
        if error_code(exc) != "NoSuchLifecycleConfiguration":
            raise
        return []
