"""Building blocks of the planners: the resources both endpoints are made of.

Models and endpoint configs are immutable in SageMaker, so their names end in a short hash of
their content: a change makes a new one, the endpoint is updated in place to it, and the one it
replaces is deleted after the update. The same content gives the same name, so a second deploy
finds everything ``unchanged`` and makes no call that changes anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .assets import Asset
from .config import DeployConfig
from .plan import (
    SCALABLE_DIMENSION,
    Plan,
    Resource,
    State,
    content_hash,
    diff,
    variant_resource_id,
)
from .policies import mme_policy, training_policy, trust_policy

ROLE_PATH = "/avatarforge/"
ROLE_POLICY_NAME = "avatarforge-least-privilege"
PLACEHOLDER_BUCKET = "set-deploy-bucket"  # a dry run without --bucket plans with this name
_HASH_ACCOUNT = "000000000000"  # content hashes do not depend on the account (dry run = real run)


def content_named(prefix: str, build: Callable[[str], dict[str, Any]]) -> str:
    """``<prefix>-<hash of the content>``, hashed as if in one fixed account: a dry run shows
    the names a real run uses."""
    return f"{prefix}-{content_hash(build(_HASH_ACCOUNT))}"


def role_name(config: DeployConfig, component: str) -> str:
    return f"{config.name}-{component}"


def role_arn(config: DeployConfig, component: str, account: str) -> str:
    return f"arn:aws:iam::{account}:role{ROLE_PATH}{role_name(config, component)}"


def planning_config(config: DeployConfig, blockers: list[str]) -> DeployConfig:
    if config.bucket:
        return config
    blockers.append("deploy.bucket is empty: set --bucket (or bucket in the --config file)")
    return dataclasses.replace(config, bucket=PLACEHOLDER_BUCKET)


def execution_role(
    config: DeployConfig, component: str, account: str, create_role: bool, blockers: list[str]
) -> tuple[Callable[[str], str], Resource | None]:
    """The role a component's model runs as (a function of the account, for content hashes)
    and the IAM role resource when deploy makes it."""
    given = config.role_arn
    if component == "training" and config.training_role_arn:
        given = config.training_role_arn
    if given:
        return (lambda _account: given), None
    policy = mme_policy(config, account) if component == "mme" else training_policy(config, account)
    role = Resource(
        "iam_role",
        role_name(config, component),
        {
            "RoleName": role_name(config, component),
            "Path": ROLE_PATH,
            "AssumeRolePolicyDocument": trust_policy(),
            "PolicyName": ROLE_POLICY_NAME,
            "PolicyDocument": policy,
        },
    )
    if not create_role:
        field_name = "training_role_arn (or role_arn)" if component == "training" else "role_arn"
        blockers.append(
            f"no IAM role for the {component} endpoint: set deploy.{field_name} to a role with "
            f"the trust and permissions policies printed with this plan (--json: "
            f"facts.policies.{component}), or pass --create-role to let deploy create "
            f"{ROLE_PATH}{role.name} (tagged; destroy removes it)"
        )
    return (lambda a: role_arn(config, component, a)), (role if create_role else None)


def shared_object(config: DeployConfig, asset: Asset | None, role: str) -> Resource:
    if asset is None:
        key = config.key("shared", f"{role}-NOT-BUILT.tar.gz")
        return Resource("s3_object", key, {"Bucket": config.bucket, "Key": key, "sha256": ""})
    key = config.key("shared", asset.name)
    return Resource(
        "s3_object",
        key,
        {
            "Bucket": config.bucket,
            "Key": key,
            "sha256": asset.sha256,
            "size": asset.size,
            "source": str(asset.path),
        },
    )


def bucket(config: DeployConfig) -> Resource:
    return Resource("s3_bucket", config.bucket, {"Bucket": config.bucket, "Region": config.region})


def s3_uri(obj: Resource) -> str:
    return f"s3://{obj.attrs['Bucket']}/{obj.attrs['Key']}"


def endpoint_trio(
    config: DeployConfig,
    component: str,
    account: str,
    model: Callable[[str], dict[str, Any]],
    endpoint_config: Callable[[str, str], dict[str, Any]],
) -> list[Resource]:
    """Model + EndpointConfig (both content-named) + Endpoint of one component."""
    prefix = f"{config.name}-{component}"
    model_name = content_named(prefix, model)
    model_attrs = {"ModelName": model_name, **model(account)}
    config_name = content_named(prefix, lambda a: endpoint_config(model_name, a))
    config_attrs = {"EndpointConfigName": config_name, **endpoint_config(model_name, account)}
    endpoint = config.mme_endpoint_name if component == "mme" else config.training_endpoint_name
    return [
        Resource("sagemaker_model", model_name, model_attrs),
        Resource("endpoint_config", config_name, config_attrs),
        Resource(
            "endpoint", endpoint, {"EndpointName": endpoint, "EndpointConfigName": config_name}
        ),
    ]


def scalable_target(endpoint: str, low: int, high: int) -> Resource:
    rid = variant_resource_id(endpoint)
    return Resource(
        "scalable_target",
        rid,
        {
            "ServiceNamespace": "sagemaker",
            "ResourceId": rid,
            "ScalableDimension": SCALABLE_DIMENSION,
            "MinCapacity": low,
            "MaxCapacity": high,
        },
    )


def scaling_policy(endpoint: str, name: str, policy_type: str, body: dict) -> Resource:
    key = (
        "TargetTrackingScalingPolicyConfiguration"
        if policy_type == "TargetTrackingScaling"
        else "StepScalingPolicyConfiguration"
    )
    return Resource(
        "scaling_policy",
        name,
        {
            "PolicyName": name,
            "ServiceNamespace": "sagemaker",
            "ResourceId": variant_resource_id(endpoint),
            "ScalableDimension": SCALABLE_DIMENSION,
            "PolicyType": policy_type,
            key: body,
        },
    )


def finish(plan: Plan, config: DeployConfig, state: State | None, component: str) -> Plan:
    plan.resources = diff(plan.resources, state or {}, config, component)
    for r in plan.resources:
        if r.action == "conflict":
            plan.blockers.append(f"{r.kind} {r.name}: {'; '.join(r.changes)}")
    return plan
