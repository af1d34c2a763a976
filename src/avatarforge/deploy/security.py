"""Encryption and network of a deployment: the KMS key, the bucket's default encryption, the
endpoints' VPC, and why neither endpoint runs network-isolated. Plain data for the planners.

- ``kms_key`` '' : nothing here; S3's own encryption (SSE-S3) applies.
- ``kms_key`` 'create': deploy makes a key (alias ``alias/avatarforge/<name>``, tagged) whose
  policy leaves its use to IAM and lets CloudWatch alarms publish to the encrypted alarm topic.
  ``destroy --delete-data`` schedules its deletion (:data:`KEY_DELETION_WINDOW_DAYS`), never while
  data it encrypts stays.
- ``kms_key`` an ARN: used as given; deploy never changes or deletes it.

The key encrypts: the bucket's default encryption (SSE-KMS with an S3 bucket key; a bucket deploy
did not make is not changed: a different default there blocks the plan), the async endpoint's
outputs, both endpoints' storage volumes (EBS; instance types with local NVMe storage, ml.g5
among them, encrypt that in hardware and the key does not apply to it), and the SNS topics.
"""

from __future__ import annotations

from typing import Any

from .config import KMS_CREATE, DeployConfig
from .plan import Resource, ref

KEY_DELETION_WINDOW_DAYS = 30  # KMS allows 7-30; the longest gives time to undo a destroy
# Instance families with local NVMe instance storage (EC2's "instance store volumes" list).
LOCAL_STORAGE_FAMILIES = (
    "ml.g4dn.", "ml.g5.", "ml.g6.", "ml.g6e.", "ml.p3dn.", "ml.p4d.", "ml.p4de.", "ml.p5.",
    "ml.p5e.", "ml.p5en.", "ml.m5d.", "ml.c5d.", "ml.r5d.",
)  # fmt: skip

# Why neither endpoint sets EnableNetworkIsolation: with it the container has no network at all,
# S3 included; SageMaker copies in only what it downloads itself (the MME's TargetModel tarballs,
# the async request payload).
NETWORK_ISOLATION = {
    "mme": (
        False,
        "off: a user model's bootstrap downloads the serving env (its own SigV4 GET) and the "
        "shared base downloads the base weights (boto3) from the deployment's shared/ prefix "
        "when an instance serves its first user (avatarforge.serving.bootstrap); an isolated "
        "container reaches no S3, so no user could load",
    ),
    "training": (
        False,
        "off: a job reads the user's photos and writes the model, checkpoints and job records "
        "in S3 from inside the container (avatarforge.jobs); an isolated container reaches "
        "none of them",
    ),
}
NO_INTERNET = (
    "neither endpoint needs the internet, only S3: run both in private subnets "
    "(vpc_subnets) with an S3 gateway VPC endpoint and no NAT gateway"
)


def key_id(config: DeployConfig) -> str:
    """The key as other resources name it: '' (none), the given ARN, or a reference to the key
    deploy makes (resolved to its ARN when known)."""
    if config.kms_key == KMS_CREATE:
        return ref("kms_key", config.kms_alias)
    return config.kms_key


def key_policy(account: str) -> dict[str, Any]:
    """The policy of the key deploy makes: the account's IAM policies decide who uses it (the
    endpoint roles' policies name it), and CloudWatch may use it to publish alarms to the
    encrypted alarm topic, for this account's alarms only."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "TheAccountsIamPoliciesDecide",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                "Action": "kms:*",
                "Resource": "*",
            },
            {
                "Sid": "CloudWatchAlarmsPublishToTheEncryptedTopic",
                "Effect": "Allow",
                "Principal": {"Service": "cloudwatch.amazonaws.com"},
                "Action": ["kms:Decrypt", "kms:GenerateDataKey*"],
                "Resource": "*",
                "Condition": {"StringEquals": {"aws:SourceAccount": account}},
            },
        ],
    }


def kms_resources(config: DeployConfig, account: str) -> list[Resource]:
    """[the key deploy makes], [the bucket's default encryption with the key]."""
    out = []
    if config.kms_key == KMS_CREATE:
        out.append(
            Resource(
                "kms_key",
                config.kms_alias,
                {
                    "AliasName": config.kms_alias,
                    "Description": f"avatarforge {config.name}: S3 objects, endpoint volumes, SNS",
                    "Policy": key_policy(account),
                },
            )
        )
    if config.kms_key:
        rule = {
            "ApplyServerSideEncryptionByDefault": {
                "SSEAlgorithm": "aws:kms",
                "KMSMasterKeyID": key_id(config),
            },
            "BucketKeyEnabled": True,  # one data key per object batch: far fewer KMS calls
        }
        out.append(
            Resource(
                "s3_bucket_encryption", config.bucket, {"Bucket": config.bucket, "Rules": [rule]}
            )
        )
    return out


def vpc_config(config: DeployConfig) -> dict[str, Any]:
    """``{"VpcConfig": ...}`` for CreateModel, or nothing (keeps existing models' names)."""
    if not config.subnets:
        return {}
    return {"VpcConfig": {"SecurityGroupIds": config.security_groups, "Subnets": config.subnets}}


def volume_key(config: DeployConfig) -> dict[str, str]:
    """``{"KmsKeyId": ...}`` for CreateEndpointConfig, or nothing."""
    return {"KmsKeyId": key_id(config)} if config.kms_key else {}


def has_local_storage(instance_type: str) -> bool:
    return instance_type.startswith(LOCAL_STORAGE_FAMILIES)


def facts(config: DeployConfig, component: str, instance_type: str) -> dict[str, Any]:
    """What the plan prints about encryption and network for one endpoint."""
    isolated, why = NETWORK_ISOLATION[component]
    if config.kms_key == KMS_CREATE:
        key = f"made by deploy ({config.kms_alias}; destroy --delete-data schedules its deletion)"
    else:
        key = config.kms_key or "none: S3's own encryption (SSE-S3), AWS-owned keys elsewhere"
    volumes = "none"
    if config.kms_key:
        volumes = "EBS volumes with the key"
        if has_local_storage(instance_type):
            volumes = (
                f"{instance_type} has local NVMe instance storage, which the instance encrypts "
                "in hardware; KmsKeyId does not apply to it (CreateEndpointConfig's "
                "documentation), only to EBS volumes"
            )
    return {
        "kms_key": key,
        "volumes": volumes,
        "vpc": (
            {"subnets": config.subnets, "security_groups": config.security_groups}
            if config.subnets
            else None
        ),
        "network_isolation": isolated,
        "network_isolation_why": why,
        "internet": NO_INTERNET,
    }


def notes(config: DeployConfig) -> list[str]:
    """What the operator must arrange where deploy does not make the thing itself."""
    out = []
    if config.kms_key and config.kms_key != KMS_CREATE:
        out.append(
            "the given kms_key's policy must let the endpoint roles use it and let "
            "cloudwatch.amazonaws.com use it (kms:Decrypt, kms:GenerateDataKey*), or alarms "
            "cannot notify the encrypted alarm topic"
        )
    if any(protocol == "sqs" for protocol, _ in config.subscriptions):
        out.append(
            f"an SQS subscriber's queue policy must let sns.amazonaws.com send to it from "
            f"{config.alarm_topic_name} (and its KMS key, if any, let SNS use it)"
        )
    return out
