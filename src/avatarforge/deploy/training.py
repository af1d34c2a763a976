"""The plan of ``deploy training``: the async training endpoint (our LMI image), scale to zero."""

from __future__ import annotations

from typing import Any

from . import operations, security
from .assets import Asset
from .config import DeployConfig
from .images import inference_ami, lmi_image_uri
from .plan import VARIANT, Plan, Resource, State, ref
from .policies import topic_arn, training_policy, trust_policy
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
from .throughput import training_cost

# The training service reads its settings from AVATARFORGE_SERVICE_<FIELD> (fields of
# avatarforge.jobs.ServiceConfig; not imported here: that package imports the trainer).
SERVICE_ENV_PREFIX = "AVATARFORGE_SERVICE_"
# The AWS pattern for async endpoints ("Autoscale an asynchronous endpoint").
TRAINING_SCALE_OUT_COOLDOWN_S, TRAINING_SCALE_IN_COOLDOWN_S = 300, 600
WAKE_COOLDOWN_S = 300


def service_env_name(field_name: str) -> str:
    """``max_concurrent_jobs`` -> ``AVATARFORGE_SERVICE_MAX_CONCURRENT_JOBS``."""
    return SERVICE_ENV_PREFIX + field_name.upper()


def training_environment(config: DeployConfig, base_uri: str) -> dict[str, str]:
    """The training container's environment (the service's settings; one base for training and
    serving: the same tarball the MME uses)."""
    return {
        service_env_name("base_source"): base_uri,
        service_env_name("shared_dir"): config.shared_dir,
        service_env_name("max_concurrent_jobs"): str(config.training_concurrency),
        service_env_name("deadline_s"): str(config.training_deadline_s),
        # where jobs may read photos and write models and work: the deployment's, not a request's
        service_env_name("s3_prefix"): config.s3(""),
        "AWS_DEFAULT_REGION": config.region,
    }


def plan_training(
    config: DeployConfig,
    base: Asset,
    state: State | None = None,
    *,
    account: str = "",
    create_role: bool = False,
) -> Plan:
    """The async training endpoint: bucket, base, topics, [role], LMI model, async config,
    endpoint, and scale to zero (min 0, backlog target tracking, a wake-up step policy + alarm)."""
    blockers: list[str] = []
    cfg = planning_config(config, blockers)
    acct = account or "*"
    image = cfg.training_image_uri
    if not image:
        blockers.append(
            "deploy.training_image_uri is empty: build the training image (make training-image), "
            "push it to ECR in your account, and set training_image_uri to its URI"
        )
        image = f"<your account>.dkr.ecr.{cfg.region}.amazonaws.com/avatarforge-training:<tag>"
    base_obj = shared_object(cfg, base, "base")
    role, role_resource = execution_role(cfg, "training", acct, create_role, blockers)
    success, error = cfg.success_topic_name, cfg.error_topic_name
    key = security.key_id(cfg)

    def model(a: str) -> dict[str, Any]:
        return {
            "ExecutionRoleArn": role(a),
            "PrimaryContainer": {
                "Image": image,
                "Mode": "SingleModel",
                "Environment": training_environment(cfg, s3_uri(base_obj)),
            },
            **security.vpc_config(cfg),
        }

    def endpoint_config(model_name: str, a: str) -> dict[str, Any]:
        return {
            "ProductionVariants": [
                {
                    "VariantName": VARIANT,
                    "ModelName": model_name,
                    "InstanceType": cfg.training_instance_type,
                    # an async endpoint starts with one instance; autoscaling takes it to zero
                    "InitialInstanceCount": 1,
                    **inference_ami(cfg.inference_ami_version),
                }
            ],
            "AsyncInferenceConfig": {
                "ClientConfig": {"MaxConcurrentInvocationsPerInstance": cfg.training_concurrency},
                "OutputConfig": {
                    "S3OutputPath": cfg.async_output_prefix,
                    "S3FailurePath": cfg.async_failure_prefix,
                    "NotificationConfig": {
                        "SuccessTopic": topic_arn(cfg, success, a),
                        "ErrorTopic": topic_arn(cfg, error, a),
                    },
                    **security.volume_key(cfg),  # the outputs, encrypted with the key
                },
            },
            **security.volume_key(cfg),
        }

    trio = endpoint_trio(cfg, "training", acct, model, endpoint_config)
    endpoint = cfg.training_endpoint_name
    wake = f"{endpoint}-wake-on-backlog"
    dims = [{"Name": "EndpointName", "Value": endpoint}]
    alarms = operations.training_alarms(cfg)
    resources = [
        bucket(cfg),
        *security.kms_resources(cfg, acct),
        operations.lifecycle(cfg),
        base_obj,
        Resource("sns_topic", success, {"Name": success, "KmsMasterKeyId": key}),
        Resource("sns_topic", error, {"Name": error, "KmsMasterKeyId": key}),
        *([role_resource] if role_resource else []),
        operations.log_group(cfg, endpoint),
        *trio,
        scalable_target(endpoint, 0, cfg.training_max_instances),
        scaling_policy(
            endpoint,
            f"{endpoint}-backlog",
            "TargetTrackingScaling",
            {
                "TargetValue": float(cfg.training_concurrency),
                "CustomizedMetricSpecification": {
                    "MetricName": "ApproximateBacklogSizePerInstance",
                    "Namespace": "AWS/SageMaker",
                    "Dimensions": dims,
                    "Statistic": "Average",
                },
                "ScaleOutCooldown": TRAINING_SCALE_OUT_COOLDOWN_S,
                "ScaleInCooldown": TRAINING_SCALE_IN_COOLDOWN_S,
            },
        ),
        # Target tracking cannot leave zero instances (backlog per instance is undefined at
        # zero): this step policy, fired by the alarm below, adds the first instance.
        scaling_policy(
            endpoint,
            wake,
            "StepScaling",
            {
                "AdjustmentType": "ChangeInCapacity",
                "MetricAggregationType": "Average",
                "Cooldown": WAKE_COOLDOWN_S,
                "StepAdjustments": [{"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}],
            },
        ),
        Resource(
            "cloudwatch_alarm",
            f"{endpoint}-has-backlog-without-capacity",
            {
                "AlarmName": f"{endpoint}-has-backlog-without-capacity",
                "AlarmDescription": "a training job waits and no instance runs: wake the endpoint",
                "MetricName": "HasBacklogWithoutCapacity",
                "Namespace": "AWS/SageMaker",
                "Statistic": "Average",
                "Dimensions": dims,
                "Period": 60,
                "EvaluationPeriods": 2,
                "DatapointsToAlarm": 2,
                "Threshold": 1.0,
                "ComparisonOperator": "GreaterThanOrEqualToThreshold",
                "TreatMissingData": "missing",
                "AlarmActions": [ref("scaling_policy", wake)],
            },
        ),
        *operations.operations(cfg, key, alarms),
    ]
    facts = {
        "image": {
            "uri": image,
            "built_from": lmi_image_uri(cfg.region, cfg.lmi_image_tag),
            "note": "our image, FROM the LMI image; you build and push it (make training-image)",
        },
        "inference_ami": cfg.inference_ami_version or "SageMaker's default",
        "assets": {"base": base.to_dict()},
        "s3": {
            "photos": cfg.photos_prefix,
            "jobs": cfg.jobs_prefix,
            "output": cfg.async_output_prefix,
            "failure": cfg.async_failure_prefix,
        },
        "endpoint": endpoint,
        "topics": {"success": topic_arn(cfg, success, acct), "error": topic_arn(cfg, error, acct)},
        # The endpoint config has no timeout field: InvokeEndpointAsync takes
        # InvocationTimeoutSeconds and RequestTTLSeconds per request: the client sends both.
        "invocation_timeout_s": cfg.training_timeout_s,
        "request_ttl_s": cfg.training_request_ttl_s,
        "service_deadline_s": cfg.training_deadline_s,
        "cost": {
            **cost_line(cfg.training_instance_type, 0, cfg.training_max_instances),
            "per_job": training_cost(cfg.training_instance_type),
        },
        "security": security.facts(cfg, "training", cfg.training_instance_type),
        **operations.facts(cfg, alarms),
        "execution_role": role(acct),
        "policies": {
            "training": {"trust": trust_policy(), "permissions": training_policy(cfg, acct)}
        },
    }
    notes = [
        f"scales to zero when idle: {cfg.training_instance_type} costs nothing while no job "
        "waits; the first job after idle waits for an instance to start (minutes)",
        f"clients send InvocationTimeoutSeconds={cfg.training_timeout_s} and "
        f"RequestTTLSeconds={cfg.training_request_ttl_s} with each job (InvokeEndpointAsync "
        "takes them per request; the endpoint config has no such fields)",
        *security.notes(cfg),
    ]
    plan = Plan("training", cfg.name, cfg.region, account, resources, facts, blockers, notes)
    return finish(plan, cfg, state, "training")
