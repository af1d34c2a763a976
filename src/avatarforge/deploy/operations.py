"""Retention and operations of a deployment: S3 lifecycle rules, log group retention, the alarms
of both endpoints, their SNS topic and its subscriptions. Plain data for the planners.

Retention: photos, job records and work files, async outputs and failures expire
``retention_days`` after they are written (for a job, its upload: the job itself runs within
RequestTTLSeconds + InvocationTimeoutSeconds of it). User models (``models/``) and the shared
assets stay. A versioned bucket keeps an expired object as a noncurrent version: those go one day
later. The rules are this deployment's own (IDs ``avatarforge:<name>:<key prefix>``); other
rules of the bucket are kept as they are.

Alarm thresholds are fixed here, each with its reason; every alarm notifies the topic
``<name>-alarms`` when it fires and when it clears.
"""

from __future__ import annotations

from typing import Any

from .config import DeployConfig
from .plan import VARIANT, Resource, ref
from .throughput import gpu_of

RETENTION_FOLDERS = ("photos/", "jobs/", "async/out/", "async/failed/")
INVOCATION_LIMIT_S = 60  # SageMaker's limit on one InvokeEndpoint
MICROSECONDS = 1_000_000


def lifecycle_rule_ids(config: DeployConfig) -> list[str]:
    """The IDs of this deployment's rules: what it may replace or remove, and nothing else."""
    return [f"avatarforge:{config.name}:{config.key(folder)}" for folder in RETENTION_FOLDERS]


def lifecycle(config: DeployConfig) -> Resource:
    """This deployment's lifecycle rules (none when retention_days is 0)."""
    rules = []
    if config.retention_days:
        for rule_id, folder in zip(lifecycle_rule_ids(config), RETENTION_FOLDERS, strict=True):
            rules.append(
                {
                    "ID": rule_id,
                    "Filter": {"Prefix": config.key(folder)},
                    "Status": "Enabled",
                    "Expiration": {"Days": config.retention_days},
                    "NoncurrentVersionExpiration": {"NoncurrentDays": 1},
                    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                }
            )
    name = f"s3://{config.bucket}/{config.prefix}"
    return Resource("s3_lifecycle", name, {"Bucket": config.bucket, "Rules": rules})


def log_group_name(endpoint: str) -> str:
    return f"/aws/sagemaker/Endpoints/{endpoint}"


def log_group(config: DeployConfig, endpoint: str) -> Resource:
    """The endpoint's log group, made before the endpoint so that SageMaker writes into one with
    a retention (it would make one that keeps everything)."""
    name = log_group_name(endpoint)
    days = config.log_retention_days or None  # None: never expire
    return Resource("log_group", name, {"logGroupName": name, "retentionInDays": days})


def alarm_topic(config: DeployConfig, key: str) -> Resource:
    name = config.alarm_topic_name
    return Resource("sns_topic", name, {"Name": name, "KmsMasterKeyId": key})


def subscriptions(config: DeployConfig) -> list[Resource]:
    topic = ref("sns_topic", config.alarm_topic_name)
    return [
        Resource(
            "sns_subscription",
            f"{protocol}:{endpoint}",
            {"TopicArn": topic, "Protocol": protocol, "Endpoint": endpoint},
        )
        for protocol, endpoint in config.subscriptions
    ]


def _alarm(
    config: DeployConfig,
    name: str,
    description: str,
    metric: dict[str, Any],
    threshold: float,
    *,
    period: int = 300,
    periods: int = 1,
) -> Resource:
    topic = ref("sns_topic", config.alarm_topic_name)
    return Resource(
        "cloudwatch_alarm",
        name,
        {
            "AlarmName": name,
            "AlarmDescription": description,
            **metric,
            "Period": period,
            "EvaluationPeriods": periods,
            "DatapointsToAlarm": periods,
            "Threshold": float(threshold),
            "ComparisonOperator": "GreaterThanOrEqualToThreshold",
            "TreatMissingData": "notBreaching",  # no traffic is no fault
            "AlarmActions": [topic],
            "OKActions": [topic],
        },
    )


def _metric(namespace: str, name: str, dims: list, statistic: str) -> dict[str, Any]:
    stat = {"ExtendedStatistic": statistic} if statistic.startswith("p") else {}
    return {
        "MetricName": name,
        "Namespace": namespace,
        **(stat or {"Statistic": statistic}),
        "Dimensions": dims,
    }


def mme_alarms(config: DeployConfig) -> list[Resource]:
    endpoint = config.mme_endpoint_name
    dims = [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": VARIANT}]
    gpu = gpu_of(config.mme_instance_type)
    gpus = gpu.count if gpu else 1  # GPUMemoryUtilization is 0-100 per GPU, summed
    return [
        _alarm(
            config,
            f"{endpoint}-5xx-errors",
            "5 or more 5xx answers in 5 minutes: a container failing (our models answer "
            "retryable conditions as UNAVAILABLE, which SageMaker passes as a 4xx ModelError)",
            _metric("AWS/SageMaker", "Invocation5XXErrors", dims, "Sum"),
            5,
        ),
        _alarm(
            config,
            f"{endpoint}-model-latency",
            f"p90 model latency over 5 minutes reaches 45 s, 3/4 of SageMaker's "
            f"{INVOCATION_LIMIT_S} s limit: requests are about to time out (scale out, or lower "
            "serving.max_request_cost)",
            _metric("AWS/SageMaker", "ModelLatency", dims, "p90"),
            45 * MICROSECONDS,
        ),
        _alarm(
            config,
            f"{endpoint}-model-loading-wait",
            "requests wait 20 s on average for their user model to load: a cold user loads in "
            "seconds next to a running shared base; this long means the shared base restarts or "
            "instances evict and reload models under memory pressure",
            _metric("AWS/SageMaker", "ModelLoadingWaitTime", dims, "Average"),
            20 * MICROSECONDS,
        ),
        _alarm(
            config,
            f"{endpoint}-memory",
            "host memory 90% or more for 15 minutes: each loaded user model is a python process; "
            "SageMaker unloads models only when memory runs out",
            _metric("/aws/sagemaker/Endpoints", "MemoryUtilization", dims, "Average"),
            90,
            periods=3,
        ),
        _alarm(
            config,
            f"{endpoint}-gpu-memory",
            f"GPU memory 90% or more (of {gpus} GPU(s)) for 15 minutes: the shared base, its "
            "adapter slots and batches no longer fit beside each other",
            _metric("/aws/sagemaker/Endpoints", "GPUMemoryUtilization", dims, "Average"),
            90 * gpus,
            periods=3,
        ),
    ]


def training_alarms(config: DeployConfig) -> list[Resource]:
    endpoint = config.training_endpoint_name
    variant = [
        {"Name": "EndpointName", "Value": endpoint},
        {"Name": "VariantName", "Value": VARIANT},
    ]
    age = config.training_request_ttl_s // 2
    return [
        _alarm(
            config,
            f"{endpoint}-failed-jobs",
            "3 or more training jobs failed within an hour (one user's unusable photos fail one "
            "job; several mean the service fails): see async/failed/ and the endpoint's logs",
            _metric("AWS/SageMaker", "InvocationFailures", variant, "Sum"),
            3,
            period=3600,
        ),
        _alarm(
            config,
            f"{endpoint}-backlog-age",
            f"the oldest queued job has waited {age} s, half of RequestTTLSeconds "
            f"({config.training_request_ttl_s} s): it expires unstarted unless capacity comes "
            "(instance quota, scaling, training_max_instances)",
            _metric(
                "AWS/SageMaker",
                "ApproximateAgeOfOldestRequest",
                [{"Name": "EndpointName", "Value": endpoint}],
                "Maximum",
            ),
            age,
        ),
    ]


def operations(config: DeployConfig, key: str, alarms: list[Resource]) -> list[Resource]:
    """The alarm topic, its subscriptions, then the alarms that notify it."""
    return [alarm_topic(config, key), *subscriptions(config), *alarms]


def facts(config: DeployConfig, alarms: list[Resource]) -> dict[str, Any]:
    return {
        "retention": {
            "days": config.retention_days or None,
            "expire": [config.key(f) for f in RETENTION_FOLDERS] if config.retention_days else [],
            "kept": [config.key("models/"), config.key("shared/")],
            "log_retention_days": config.log_retention_days or None,
        },
        "alarms": {
            "topic": config.alarm_topic_name,
            "names": [a.name for a in alarms],
            "subscriptions": [f"{p}:{e}" for p, e in config.subscriptions],
        },
    }
