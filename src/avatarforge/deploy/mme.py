"""The plan of ``deploy mme``: the multi-model endpoint on the stock SageMaker Triton image."""

from __future__ import annotations

from typing import Any

from ..serving.bootstrap import (
    ENV_BASE_SOURCE,
    ENV_ENV_PYTHON,
    ENV_ENV_SHA256,
    ENV_ENV_SOURCE,
    ENV_SHARED_DIR,
)
from ..serving.config import ServingConfig
from ..tritonserver.sagemaker import MME_ENV
from . import operations, security
from .assets import Asset, MMEAssets
from .config import DeployConfig
from .images import inference_ami, triton_image_uri, triton_python
from .plan import VARIANT, Plan, State
from .policies import mme_policy, trust_policy
from .prices import cost_line
from .resources import (
    bucket,
    endpoint_trio,
    execution_role,
    finish,
    planning_config,
    s3_uri,
    scalable_target,
    scaling_policy,
    shared_object,
)
from .throughput import mme_scaling, serving_cost

# Scale out fast (a cold user model loads in seconds), in slowly (a scaled-in instance drops
# every user model it had loaded).
MME_SCALE_OUT_COOLDOWN_S, MME_SCALE_IN_COOLDOWN_S = 60, 600


def mme_environment(
    config: DeployConfig, base_uri: str, env_uri: str, env: Asset | None, safety_uri: str = ""
) -> dict[str, str]:
    """The MME container's environment, made here and nowhere else: tritonserver's settings
    (:data:`~avatarforge.tritonserver.sagemaker.MME_ENV`: ping mode live, verbose logs off, and
    why), where the user models' bootstrap finds the shared base and serving env (see
    avatarforge.serving.bootstrap), the shared base's settings (``deploy.mme_serving``) and
    safety checker when there are any, and the region of their S3 fetches."""
    safety = {ServingConfig.env_name("safety_checker"): safety_uri} if safety_uri else {}
    return {
        **config.mme_serving_env(),
        **safety,
        **MME_ENV,
        ENV_SHARED_DIR: config.shared_dir,
        ENV_BASE_SOURCE: base_uri,
        ENV_ENV_SOURCE: env_uri,
        ENV_ENV_SHA256: env.sha256 if env else "",
        ENV_ENV_PYTHON: env.python if env else triton_python(config.triton_image_tag),
        "AWS_DEFAULT_REGION": config.region,
    }


def plan_mme(
    config: DeployConfig,
    assets: MMEAssets,
    state: State | None = None,
    *,
    account: str = "",
    create_role: bool = False,
) -> Plan:
    """The MME: bucket, shared assets, [role], Triton model, config, endpoint, autoscaling."""
    blockers: list[str] = []
    cfg = planning_config(config, blockers)
    acct = account or "*"
    tag = cfg.triton_image_tag
    image = triton_image_uri(cfg.region, tag, cfg.mme_instance_type)
    ami = inference_ami(cfg.inference_ami_version)
    base_obj = shared_object(cfg, assets.base, "base")
    env_obj = shared_object(cfg, assets.env, "env")
    safety_obj = shared_object(cfg, assets.safety, "safety") if assets.safety else None
    safety_uri = s3_uri(safety_obj) if safety_obj else ""
    if assets.env is None:
        blockers.append(assets.env_problem)
    role, role_resource = execution_role(cfg, "mme", acct, create_role, blockers)
    scaling = mme_scaling(cfg.mme_instance_type, cfg.mme_invocations_per_instance)
    if scaling["target"] is None:
        blockers.append(
            f"no measured throughput for {cfg.mme_instance_type} (one GPU of a known kind): set "
            "deploy.mme_invocations_per_instance, the invocations per minute an instance should "
            "carry before autoscaling adds one"
        )
    key = security.key_id(cfg)

    def model(a: str) -> dict[str, Any]:
        return {
            "ExecutionRoleArn": role(a),
            "PrimaryContainer": {
                "Image": image,
                "Mode": "MultiModel",
                "ModelDataUrl": cfg.models_prefix,
                "Environment": mme_environment(
                    cfg, s3_uri(base_obj), s3_uri(env_obj), assets.env, safety_uri
                ),
            },
            **security.vpc_config(cfg),
        }

    def endpoint_config(model_name: str, a: str) -> dict[str, Any]:
        return {
            "ProductionVariants": [
                {
                    "VariantName": VARIANT,
                    "ModelName": model_name,
                    "InstanceType": cfg.mme_instance_type,
                    "InitialInstanceCount": cfg.mme_min_instances,
                    **ami,
                }
            ],
            **security.volume_key(cfg),
        }

    trio = endpoint_trio(cfg, "mme", acct, model, endpoint_config)
    endpoint = cfg.mme_endpoint_name
    alarms = operations.mme_alarms(cfg)
    resources = [
        bucket(cfg),
        *security.kms_resources(cfg, acct),
        operations.lifecycle(cfg),
        base_obj,
        env_obj,
        *([safety_obj] if safety_obj else []),
        *([role_resource] if role_resource else []),
        operations.log_group(cfg, endpoint),
        *trio,
        scalable_target(endpoint, cfg.mme_min_instances, cfg.mme_max_instances),
        scaling_policy(
            endpoint,
            f"{endpoint}-invocations",
            "TargetTrackingScaling",
            {
                "TargetValue": float(scaling["target"] or 1),
                "PredefinedMetricSpecification": {
                    "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
                },
                "ScaleOutCooldown": MME_SCALE_OUT_COOLDOWN_S,
                "ScaleInCooldown": MME_SCALE_IN_COOLDOWN_S,
            },
        ),
        *operations.operations(cfg, key, alarms),
    ]
    cost = cost_line(cfg.mme_instance_type, cfg.mme_min_instances, cfg.mme_max_instances)
    cost["per_images"] = serving_cost(
        cfg.mme_instance_type, scaling["throughput"], scaling["target"]
    )
    facts = {
        "image": {
            "uri": image,
            "triton_tag": tag,
            "stub_python": triton_python(tag),
            "note": "the serving env must be built for the stub's Python",
        },
        "inference_ami": cfg.inference_ami_version or "SageMaker's default",
        "triton": {
            "ping_mode": MME_ENV["SAGEMAKER_TRITON_PING_MODE"],
            "log_verbose": MME_ENV["SAGEMAKER_TRITON_LOG_VERBOSE"],
        },
        "assets": {
            "base": assets.base.to_dict() if assets.base else None,
            "env": assets.env.to_dict() if assets.env else None,
        },
        "s3": {"models": cfg.models_prefix, "shared": cfg.shared_prefix},
        "endpoint": endpoint,
        "scaling": scaling,
        "cost": cost,
        "security": security.facts(cfg, "mme", cfg.mme_instance_type),
        **operations.facts(cfg, alarms),
        "execution_role": role(acct),
        "policies": {"mme": {"trust": trust_policy(), "permissions": mme_policy(cfg, acct)}},
    }
    notes = [
        f"user models go to {cfg.models_prefix}<user>.tar.gz; the endpoint loads one on its "
        "first request (TargetModel=<user>.tar.gz)",
        *security.notes(cfg),
    ]
    plan = Plan("mme", cfg.name, cfg.region, account, resources, facts, blockers, notes)
    return finish(plan, cfg, state, "mme")
