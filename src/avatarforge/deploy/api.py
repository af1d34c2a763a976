"""The plan of the HTTP API (``avatarforge api``, ``api_container/``): optional, and no SageMaker
resource. The API is a container the operator runs behind their own load balancer or API
gateway (TLS, WAF, a fleet-wide rate limit live there); deploy plans only the IAM role it runs
as, limited to what it calls:

- S3 under the deployment's prefix: photos (upload, forget), job records (its ``api.json``, the
  client's request and submission, read status and progress; forget), the async outputs and
  failures (status; forget), ``models/`` (whether a user has a model; forget), ``api/`` (the
  webhook outbox); versions too, since forget removes every version on a versioned bucket;
- ``sagemaker:InvokeEndpoint`` on the MME and ``sagemaker:InvokeEndpointAsync`` on the training
  endpoint, nothing else of SageMaker.

Not in it: SNS, ECR, logs (the container platform's own execution role pulls the image and
ships logs), any other bucket. The trust policy names ECS tasks; on EKS (IRSA) or EC2 the
operator swaps the principal, the permissions stay.
"""

from __future__ import annotations

from typing import Any

from .config import DeployConfig
from .plan import Plan, Resource, State
from .policies import VERSION, s3_object_arn
from .resources import ROLE_PATH, ROLE_POLICY_NAME, finish, planning_config, role_name

COMPONENT = "api"
READ = ("photos/", "jobs/", "models/", "async/out/", "async/failed/", "api/")
WRITE = ("photos/", "jobs/", "api/")
DELETE = ("photos/", "jobs/", "models/", "async/out/", "async/failed/", "api/")  # forget
IMAGE_DOCKERFILE = "api_container/Dockerfile"
# what the image runs (its CMD): the settings files mounted read-only
COMMAND = [
    "avatarforge", "api", "--host", "0.0.0.0", "--port", "8800",
    "--api-config", "/etc/avatarforge/api.json", "--config", "/etc/avatarforge/deploy.json",
]  # fmt: skip


def api_trust_policy(service: str = "ecs-tasks.amazonaws.com") -> dict[str, Any]:
    return {
        "Version": VERSION,
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}
        ],
    }


def endpoint_arn(config: DeployConfig, name: str, account: str) -> str:
    return f"arn:aws:sagemaker:{config.region}:{account}:endpoint/{name.lower()}"


def api_policy(config: DeployConfig, account: str = "*") -> dict[str, Any]:
    """The API's role: what the API itself calls, under the deployment's prefix only."""
    bucket = f"arn:aws:s3:::{config.bucket}"
    return {
        "Version": VERSION,
        "Statement": [
            {
                "Sid": "ReadRecords",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:GetObjectVersion"],
                "Resource": [s3_object_arn(config, f) for f in READ],
            },
            {
                "Sid": "WritePhotosAndRecords",
                "Effect": "Allow",
                "Action": ["s3:PutObject"],
                "Resource": [s3_object_arn(config, f) for f in WRITE],
            },
            {
                "Sid": "ForgetAndOutbox",
                "Effect": "Allow",
                "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
                "Resource": [s3_object_arn(config, f) for f in DELETE],
            },
            {
                "Sid": "ListOurPrefixes",
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:ListBucketVersions"],
                "Resource": [bucket],
                "Condition": {"StringLike": {"s3:prefix": [config.key(f) + "*" for f in READ]}},
            },
            {
                "Sid": "KnowIfVersioned",
                "Effect": "Allow",
                "Action": ["s3:GetBucketVersioning"],
                "Resource": [bucket],
            },
            {
                "Sid": "Generate",
                "Effect": "Allow",
                "Action": ["sagemaker:InvokeEndpoint"],
                "Resource": [endpoint_arn(config, config.mme_endpoint_name, account)],
            },
            {
                "Sid": "StartTrainings",
                "Effect": "Allow",
                "Action": ["sagemaker:InvokeEndpointAsync"],
                "Resource": [endpoint_arn(config, config.training_endpoint_name, account)],
            },
        ],
    }


def plan_api(
    config: DeployConfig,
    state: State | None = None,
    *,
    account: str = "",
    create_role: bool = False,
) -> Plan:
    """The API's role (made only with ``create_role``), and what the operator runs: the image,
    its environment, where it sits."""
    blockers: list[str] = []
    cfg = planning_config(config, blockers)
    acct = account or "*"
    name = role_name(cfg, COMPONENT)
    policy = api_policy(cfg, acct)
    role = Resource(
        "iam_role",
        name,
        {
            "RoleName": name,
            "Path": ROLE_PATH,
            "AssumeRolePolicyDocument": api_trust_policy(),
            "PolicyName": ROLE_POLICY_NAME,
            "PolicyDocument": policy,
        },
    )
    notes = [
        "optional: the HTTP API for an app's backend; nothing else depends on it",
        f"image: build {IMAGE_DOCKERFILE} (docker build -f {IMAGE_DOCKERFILE} .), push it to "
        "your registry, run it as a service (ECS, EKS, EC2) with this role",
        "put it behind your own load balancer or API gateway (TLS there); it listens on "
        "port 8800 and answers /healthz for health checks",
        "its settings file (API key hashes, limits: avatarforge api new-key) and the webhook "
        "secret in AVATARFORGE_API_WEBHOOK_SECRET (from your secret store), never in the image",
    ]
    if not create_role:
        notes.append(
            f"no role is created without --create-role: make {ROLE_PATH}{name} with the trust "
            f"and permissions policies printed with this plan (facts.policies.{COMPONENT})"
        )
    facts = {
        "policies": {COMPONENT: {"trust": api_trust_policy(), "permissions": policy}},
        "environment": {
            "AVATARFORGE_API_WEBHOOK_SECRET": "<at least 32 random bytes, from a secret store>",
            "AWS_DEFAULT_REGION": cfg.region,
        },
        "command": COMMAND,
    }
    plan = Plan(COMPONENT, cfg.name, cfg.region, account, [role] if create_role else [], facts,
                blockers, notes)  # fmt: skip
    return finish(plan, cfg, state, COMPONENT)
