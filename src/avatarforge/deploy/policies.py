"""Least-privilege IAM policy documents of the two endpoints' execution roles (plain dicts).

Each role may read and write only under the deployment's own S3 prefixes, publish only to its
two topics, pull only the one image repository it runs, and write logs only to its endpoint's
log group. With a KMS key (``kms_key``) each role may use only that key; in a VPC
(``vpc_subnets``) each may make network interfaces only in the deployment's subnets and security
groups. Actions AWS does not scope to resources take ``"Resource": "*"``:
``ecr:GetAuthorizationToken`` (an ECR login is account-wide), ``cloudwatch:PutMetricData``
(limited instead by a condition on the metric namespace) and, in a VPC, the EC2 ``Describe*``
calls SageMaker makes to attach the endpoint to it. :data:`UNSCOPED_ACTIONS` lists them; the
tests check that nothing else is unscoped.

``account`` is the AWS account id where known (a real run reads it from STS); a dry run has
none and writes ``*`` in the account field of the ARNs, which IAM accepts as-is.
"""

from __future__ import annotations

from typing import Any

from .config import DeployConfig
from .images import ecr_repository_arn, image_repository_arn, parse_ecr_uri, triton_image_uri
from .security import key_id

VERSION = "2012-10-17"
_EC2_DESCRIBE = [
    "ec2:DescribeDhcpOptions",
    "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeSecurityGroups",
    "ec2:DescribeSubnets",
    "ec2:DescribeVpcs",
]
UNSCOPED_ACTIONS = frozenset(
    {"ecr:GetAuthorizationToken", "cloudwatch:PutMetricData", *_EC2_DESCRIBE}
)
# The repository name written into the training policy while no training image is configured.
TRAINING_REPOSITORY_PLACEHOLDER = "avatarforge-training"
_ECR_PULL = ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]

Policy = dict[str, Any]


def trust_policy() -> Policy:
    """Who may assume the role: SageMaker, nobody else."""
    return {
        "Version": VERSION,
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "sagemaker.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ],
    }


def s3_object_arn(config: DeployConfig, folder: str) -> str:
    """``arn:aws:s3:::<bucket>/<prefix><folder>*``: every object under one of our folders."""
    return f"arn:aws:s3:::{config.bucket}/{config.key(folder)}*"


def topic_arn(config: DeployConfig, name: str, account: str) -> str:
    return f"arn:aws:sns:{config.region}:{account}:{name}"


def _log_resources(config: DeployConfig, account: str, endpoint: str) -> list[str]:
    group = f"arn:aws:logs:{config.region}:{account}:log-group:/aws/sagemaker/Endpoints/{endpoint}"
    return [group, f"{group}:log-stream:*"]


def _common(config: DeployConfig, account: str, endpoint: str, repository_arn: str) -> list:
    return [
        {
            "Sid": "PullImage",
            "Effect": "Allow",
            "Action": list(_ECR_PULL),
            "Resource": [repository_arn],
        },
        {
            "Sid": "EcrLoginIsAccountWide",
            "Effect": "Allow",
            "Action": ["ecr:GetAuthorizationToken"],
            "Resource": "*",
        },
        {
            "Sid": "EndpointLogs",
            "Effect": "Allow",
            "Action": [
                "logs:CreateLogGroup",
                "logs:CreateLogStream",
                "logs:DescribeLogStreams",
                "logs:PutLogEvents",
            ],
            "Resource": _log_resources(config, account, endpoint),
        },
        {
            "Sid": "EndpointMetrics",
            "Effect": "Allow",
            "Action": ["cloudwatch:PutMetricData"],
            "Resource": "*",
            "Condition": {
                "StringEquals": {
                    "cloudwatch:namespace": ["/aws/sagemaker/Endpoints", "AWS/SageMaker"]
                }
            },
        },
    ]


def _key_and_network(config: DeployConfig, account: str, *, writes: bool) -> list[Policy]:
    """Use of the deployment's KMS key (read; write too for the training role, which writes
    objects and its SNS notifications), and SageMaker's network interfaces in its VPC."""
    out: list[Policy] = []
    if config.kms_key:
        actions = ["kms:Decrypt", "kms:DescribeKey"] + (["kms:GenerateDataKey"] if writes else [])
        out.append(
            {"Sid": "UseTheDeploymentKey", "Effect": "Allow", "Action": actions,
             "Resource": [key_id(config)]}
        )  # fmt: skip
        out.append(
            {
                "Sid": "EncryptTheEndpointVolumes",
                "Effect": "Allow",
                "Action": ["kms:CreateGrant"],
                "Resource": [key_id(config)],
                "Condition": {"Bool": {"kms:GrantIsForAWSResource": "true"}},
            }
        )
    if config.subnets:
        ec2 = f"arn:aws:ec2:{config.region}:{account}"
        interfaces = f"{ec2}:network-interface/*"
        out += [
            {
                "Sid": "EndpointNetworkInterfaces",
                "Effect": "Allow",
                "Action": ["ec2:CreateNetworkInterface"],
                "Resource": [
                    interfaces,
                    *(f"{ec2}:subnet/{s}" for s in config.subnets),
                    *(f"{ec2}:security-group/{g}" for g in config.security_groups),
                ],
            },
            {
                "Sid": "ManageEndpointNetworkInterfaces",
                "Effect": "Allow",
                "Action": [
                    "ec2:CreateNetworkInterfacePermission",
                    "ec2:DeleteNetworkInterface",
                    "ec2:DeleteNetworkInterfacePermission",
                ],
                "Resource": [interfaces],
            },
            {
                "Sid": "DescribeTheNetworkIsAccountWide",
                "Effect": "Allow",
                "Action": list(_EC2_DESCRIBE),
                "Resource": "*",
            },
        ]
    return out


def _list_bucket(config: DeployConfig, folders: list[str]) -> Policy:
    return {
        "Sid": "ListOurPrefixes",
        "Effect": "Allow",
        "Action": ["s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{config.bucket}"],
        "Condition": {"StringLike": {"s3:prefix": [config.key(f) + "*" for f in folders]}},
    }


def mme_policy(config: DeployConfig, account: str = "*") -> Policy:
    """The MME's role: read user models and the shared assets, pull the Triton image, log."""
    image = triton_image_uri(config.region, config.triton_image_tag, config.mme_instance_type)
    triton_repo = image_repository_arn(image)
    return {
        "Version": VERSION,
        "Statement": [
            {
                "Sid": "ReadModelsAndSharedAssets",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [s3_object_arn(config, "models/"), s3_object_arn(config, "shared/")],
            },
            _list_bucket(config, ["models/", "shared/"]),
            *_common(config, account, config.mme_endpoint_name, triton_repo),
            *_key_and_network(config, account, writes=False),
        ],
    }


def training_repository_arn(config: DeployConfig, account: str = "*") -> str:
    """The ECR repository of our training image (a placeholder name until one is configured)."""
    if config.training_image_uri:
        parts = parse_ecr_uri(config.training_image_uri)
        return ecr_repository_arn(parts["region"], parts["account"], parts["repository"])
    return ecr_repository_arn(config.region, account, TRAINING_REPOSITORY_PLACEHOLDER)


def training_policy(config: DeployConfig, account: str = "*") -> Policy:
    """The training endpoint's role: read photos, jobs and the base; write job records, user
    models and the async outputs/failures; publish to its two topics; pull its image; log."""
    return {
        "Version": VERSION,
        "Statement": [
            {
                "Sid": "ReadInputs",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [
                    s3_object_arn(config, f) for f in ("photos/", "jobs/", "shared/", "models/")
                ],
            },
            {
                "Sid": "WriteResults",
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
                "Resource": [
                    s3_object_arn(config, f)
                    for f in ("jobs/", "models/", "async/out/", "async/failed/")
                ],
            },
            {
                "Sid": "CleanJobScratch",
                "Effect": "Allow",
                "Action": ["s3:DeleteObject"],
                "Resource": [s3_object_arn(config, "jobs/")],
            },
            _list_bucket(config, ["photos/", "jobs/", "shared/", "models/"]),
            {
                "Sid": "NotifyJobOutcome",
                "Effect": "Allow",
                "Action": ["sns:Publish"],
                "Resource": [
                    topic_arn(config, config.success_topic_name, account),
                    topic_arn(config, config.error_topic_name, account),
                ],
            },
            *_common(
                config,
                account,
                config.training_endpoint_name,
                training_repository_arn(config, account),
            ),
            *_key_and_network(config, account, writes=True),
        ],
    }
