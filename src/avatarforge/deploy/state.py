"""What exists in AWS: the resources a plan names (:func:`read_state`), and everything that
carries a deployment's tag (:func:`discover`, for destroy)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .aws import (
    Clients,
    DeployError,
    error_code,
    is_missing,
    lifecycle_rules,
    policy_doc,
    tag_dict,
)
from .config import DeployConfig
from .operations import lifecycle_rule_ids, log_group_name
from .plan import SCALABLE_DIMENSION, Existing, Resource, State, variant_resource_id
from .policies import topic_arn
from .resources import ROLE_PATH

# ---------------------------------------------------------------- reading what exists


def _sagemaker_tags(clients: Clients, arn: str) -> dict[str, str]:
    return tag_dict(clients("sagemaker").list_tags(ResourceArn=arn).get("Tags"))


def _read_bucket(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    s3 = clients("s3")
    s3.head_bucket(Bucket=r.name)
    region = s3.get_bucket_location(Bucket=r.name).get("LocationConstraint") or "us-east-1"
    region = {"EU": "eu-west-1"}.get(region, region)
    try:
        tags = tag_dict(s3.get_bucket_tagging(Bucket=r.name).get("TagSet"))
    except Exception as exc:
        if error_code(exc) not in {"NoSuchTagSet", "NoSuchTagSetError"}:
            raise
        tags = {}
    return Existing({"Bucket": r.name, "Region": region}, tags)


def _read_object(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    head = clients("s3").head_object(Bucket=r.attrs["Bucket"], Key=r.attrs["Key"])
    sha = head.get("Metadata", {}).get("sha256", "")
    return Existing({"Bucket": r.attrs["Bucket"], "Key": r.attrs["Key"], "sha256": sha})


def _read_role(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    iam = clients("iam")
    role = iam.get_role(RoleName=r.name)["Role"]
    try:
        policy = iam.get_role_policy(RoleName=r.name, PolicyName=r.attrs["PolicyName"])
        document = policy_doc(policy["PolicyDocument"])
    except Exception as exc:
        if not is_missing(exc):
            raise
        document = {}
    tags = tag_dict(iam.list_role_tags(RoleName=r.name).get("Tags"))
    attrs = {
        "RoleName": role["RoleName"],
        "Path": role["Path"],
        "AssumeRolePolicyDocument": policy_doc(role["AssumeRolePolicyDocument"]),
        "PolicyName": r.attrs["PolicyName"],
        "PolicyDocument": document,
    }
    return Existing(attrs, tags, role["Arn"])


def _read_model(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    found = clients("sagemaker").describe_model(ModelName=r.name)
    attrs = {k: found.get(k) for k in ("ModelName", "ExecutionRoleArn", "PrimaryContainer")}
    return Existing(attrs, _sagemaker_tags(clients, found["ModelArn"]), found["ModelArn"])


def _read_endpoint_config(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    found = clients("sagemaker").describe_endpoint_config(EndpointConfigName=r.name)
    keys = ("EndpointConfigName", "ProductionVariants", "AsyncInferenceConfig")
    attrs = {k: found[k] for k in keys if k in found}
    arn = found["EndpointConfigArn"]
    return Existing(attrs, _sagemaker_tags(clients, arn), arn)


def _read_endpoint(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    sm = clients("sagemaker")
    found = sm.describe_endpoint(EndpointName=r.name)
    attrs = {
        "EndpointName": found["EndpointName"],
        "EndpointConfigName": found["EndpointConfigName"],
        "_Status": found.get("EndpointStatus", ""),
        "_FailureReason": found.get("FailureReason", ""),
    }
    try:
        current = sm.describe_endpoint_config(EndpointConfigName=found["EndpointConfigName"])
        attrs["_InstanceType"] = current["ProductionVariants"][0].get("InstanceType", "")
    except Exception as exc:
        if not is_missing(exc):
            raise
    arn = found["EndpointArn"]
    return Existing(attrs, _sagemaker_tags(clients, arn), arn)


def _read_target(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    found = clients("application-autoscaling").describe_scalable_targets(
        ServiceNamespace="sagemaker", ResourceIds=[r.name], ScalableDimension=SCALABLE_DIMENSION
    )["ScalableTargets"]
    if not found:
        return None
    keys = ("ServiceNamespace", "ResourceId", "ScalableDimension", "MinCapacity", "MaxCapacity")
    return Existing({k: found[0][k] for k in keys}, None, found[0].get("ScalableTargetARN", ""))


def _read_policy(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    found = clients("application-autoscaling").describe_scaling_policies(
        ServiceNamespace="sagemaker",
        PolicyNames=[r.name],
        ResourceId=r.attrs["ResourceId"],
        ScalableDimension=SCALABLE_DIMENSION,
    )["ScalingPolicies"]
    found = [p for p in found if p["PolicyName"] == r.name]  # moto ignores PolicyNames
    if not found:
        return None
    return Existing(dict(found[0]), None, found[0]["PolicyARN"])


def _read_topic(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    sns = clients("sns")
    arn = topic_arn(ctx["config"], r.name, ctx["account"])
    found = sns.get_topic_attributes(TopicArn=arn)["Attributes"]
    tags = tag_dict(sns.list_tags_for_resource(ResourceArn=arn).get("Tags"))
    return Existing({"Name": r.name, "KmsMasterKeyId": found.get("KmsMasterKeyId", "")}, tags, arn)


def _bucket_tags(s3: Any, bucket: str) -> dict[str, str]:
    try:
        return tag_dict(s3.get_bucket_tagging(Bucket=bucket).get("TagSet"))
    except Exception as exc:
        if error_code(exc) not in {"NoSuchTagSet", "NoSuchTagSetError"}:
            raise
        return {}


def _read_bucket_encryption(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    s3 = clients("s3")
    tags = _bucket_tags(s3, r.attrs["Bucket"])  # NoSuchBucket: nothing exists
    try:
        rules = s3.get_bucket_encryption(Bucket=r.attrs["Bucket"])[
            "ServerSideEncryptionConfiguration"
        ]["Rules"]
    except Exception as exc:
        if error_code(exc) != "ServerSideEncryptionConfigurationNotFoundError":
            raise
        rules = []
    return Existing({"Bucket": r.attrs["Bucket"], "Rules": rules}, tags)


def _read_lifecycle(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    ids = lifecycle_rule_ids(ctx["config"])
    rules = {x.get("ID"): x for x in lifecycle_rules(clients("s3"), r.attrs["Bucket"])}
    ours = [rules[i] for i in ids if i in rules]  # in our order: compared rule by rule
    return Existing({"Bucket": r.attrs["Bucket"], "Rules": ours})


def _find_log_group(clients: Clients, name: str) -> dict | None:
    logs = clients("logs")
    for group in logs.describe_log_groups(logGroupNamePrefix=name).get("logGroups", []):
        if group["logGroupName"] == name:
            return group
    return None


def _log_group_arn(group: dict) -> str:
    return group.get("logGroupArn") or group["arn"].removesuffix(":*")


def _read_log_group(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    group = _find_log_group(clients, r.name)
    if group is None:
        return None
    arn = _log_group_arn(group)
    tags = clients("logs").list_tags_for_resource(resourceArn=arn).get("tags", {})
    attrs = {"logGroupName": r.name, "retentionInDays": group.get("retentionInDays")}
    return Existing(attrs, tags, arn)


def _read_kms_key(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    kms = clients("kms")
    key = kms.describe_key(KeyId=r.name)["KeyMetadata"]
    tags = tag_dict(kms.list_resource_tags(KeyId=key["KeyId"]).get("Tags"))
    policy = policy_doc(kms.get_key_policy(KeyId=key["KeyId"], PolicyName="default")["Policy"])
    attrs = {
        "AliasName": r.name,
        "Description": key.get("Description", ""),
        "Policy": policy,
        "_State": key.get("KeyState", ""),
    }
    return Existing(attrs, tags, key["Arn"])


def _topic_subscriptions(clients: Clients, ctx: dict) -> dict[str, Existing]:
    """The alarm topic's subscriptions by name (``<protocol>:<endpoint>``), read once."""
    if "subscriptions" not in ctx:
        config = ctx["config"]
        arn = topic_arn(config, config.alarm_topic_name, ctx["account"])
        found: dict[str, Existing] = {}
        try:
            pages = (
                clients("sns").get_paginator("list_subscriptions_by_topic").paginate(TopicArn=arn)
            )
            for page in pages:
                for sub in page["Subscriptions"]:
                    attrs = {
                        "TopicArn": arn,
                        "Protocol": sub["Protocol"],
                        "Endpoint": sub["Endpoint"],
                        "_Pending": sub["SubscriptionArn"] == "PendingConfirmation",
                    }
                    found[f"{sub['Protocol']}:{sub['Endpoint']}"] = Existing(
                        attrs, None, sub["SubscriptionArn"]
                    )
        except Exception as exc:
            if not is_missing(exc):
                raise
        ctx["subscriptions"] = found
    return ctx["subscriptions"]


def _read_subscription(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    return _topic_subscriptions(clients, ctx).get(r.name)


def _read_alarm(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    cw = clients("cloudwatch")
    found = cw.describe_alarms(AlarmNames=[r.name], AlarmTypes=["MetricAlarm"])["MetricAlarms"]
    if not found:
        return None
    alarm = found[0]
    tags = tag_dict(cw.list_tags_for_resource(ResourceARN=alarm["AlarmArn"]).get("Tags"))
    return Existing(dict(alarm), tags, alarm["AlarmArn"])


_READERS: dict[str, Callable[[Clients, Resource, dict], Existing | None]] = {
    "s3_bucket": _read_bucket,
    "s3_object": _read_object,
    "iam_role": _read_role,
    "sagemaker_model": _read_model,
    "endpoint_config": _read_endpoint_config,
    "endpoint": _read_endpoint,
    "scalable_target": _read_target,
    "scaling_policy": _read_policy,
    "sns_topic": _read_topic,
    "sns_subscription": _read_subscription,
    "cloudwatch_alarm": _read_alarm,
    "kms_key": _read_kms_key,
    "s3_bucket_encryption": _read_bucket_encryption,
    "s3_lifecycle": _read_lifecycle,
    "log_group": _read_log_group,
}


def _read_one(clients: Clients, r: Resource, ctx: dict) -> Existing | None:
    try:
        return _READERS[r.kind](clients, r, ctx)
    except Exception as exc:
        if is_missing(exc):
            return None
        if r.kind == "s3_bucket" and error_code(exc) == "403":
            raise DeployError(
                f"bucket {r.name} exists but this account cannot use it (403): choose another "
                "deploy.bucket (bucket names are global)"
            ) from exc
        raise DeployError(f"reading {r.kind} {r.name}: {exc}") from exc


def read_state(
    clients: Clients, config: DeployConfig, resources: list[Resource], component: str, account: str
) -> State:
    """What exists of ``resources``, plus this deployment's older models and endpoint configs of
    ``component`` (candidates for deletion once superseded)."""
    ctx = {"config": config, "account": account}
    state: State = {}
    for r in resources:
        if (found := _read_one(clients, r, ctx)) is not None:
            state[(r.kind, r.name)] = found
    if any(r.kind == "sns_topic" and r.name == config.alarm_topic_name for r in resources):
        for name, sub in _topic_subscriptions(clients, ctx).items():  # those to remove, too
            state.setdefault(("sns_subscription", name), sub)
    sm = clients("sagemaker")
    prefix = f"{config.name}-{component}-"
    for kind, name, arn in _sagemaker_named(sm, prefix):
        if (kind, name) not in state:
            state[(kind, name)] = Existing({}, _sagemaker_tags(clients, arn), arn)
    return state


def _sagemaker_named(sm: Any, contains: str) -> Iterator[tuple[str, str, str]]:
    """(kind, name, arn) of models, endpoint configs and endpoints whose names start with
    ``contains``."""
    listings = (  # kind, list operation, result key, and the item's fields: <Noun>Name/Arn
        ("sagemaker_model", "list_models", "Models", "Model"),
        ("endpoint_config", "list_endpoint_configs", "EndpointConfigs", "EndpointConfig"),
        ("endpoint", "list_endpoints", "Endpoints", "Endpoint"),
    )
    for kind, op, key, noun in listings:
        for page in sm.get_paginator(op).paginate(NameContains=contains):
            for item in page[key]:
                if item[f"{noun}Name"].startswith(contains):
                    yield kind, item[f"{noun}Name"], item[f"{noun}Arn"]


# ---------------------------------------------------------------- finding what destroy removes


def discover(
    clients: Clients, config: DeployConfig, account: str, *, delete_data: bool = False
) -> tuple[list[Resource], list[str]]:
    """Every resource carrying this deployment's tag, in the order destroy removes them, and
    notes on what stays. What protects or holds data stays unless ``delete_data``: the log
    groups, the lifecycle rules (they expire the data that stays) and the KMS key (it encrypts
    it)."""
    key, value = config.tag["Key"], config.tag["Value"]
    sm = clients("sagemaker")
    aas = clients("application-autoscaling")
    ours: dict[str, list[Resource]] = {
        k: [] for k in ("endpoint", "endpoint_config", "sagemaker_model")
    }
    for kind, name, arn in _sagemaker_named(sm, config.name + "-"):
        if _sagemaker_tags(clients, arn).get(key) == value:
            ours[kind].append(Resource(kind, name, {}, arn=arn))
    scaling: list[Resource] = []
    for endpoint in ours["endpoint"]:
        rid = variant_resource_id(endpoint.name)
        for p in aas.describe_scaling_policies(
            ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=SCALABLE_DIMENSION
        )["ScalingPolicies"]:
            scaling.append(
                Resource("scaling_policy", p["PolicyName"], {"ResourceId": rid}, arn=p["PolicyARN"])
            )
        for t in aas.describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[rid], ScalableDimension=SCALABLE_DIMENSION
        )["ScalableTargets"]:
            scaling.append(Resource("scalable_target", t["ResourceId"], {}))
    cw = clients("cloudwatch")
    alarms = []
    for page in cw.get_paginator("describe_alarms").paginate(AlarmNamePrefix=config.name + "-"):
        for alarm in page["MetricAlarms"]:
            tags = tag_dict(cw.list_tags_for_resource(ResourceARN=alarm["AlarmArn"]).get("Tags"))
            if tags.get(key) == value:
                alarms.append(
                    Resource("cloudwatch_alarm", alarm["AlarmName"], {}, arn=alarm["AlarmArn"])
                )
    sns = clients("sns")
    topics = []
    for page in sns.get_paginator("list_topics").paginate():
        for topic in page["Topics"]:
            arn = topic["TopicArn"]
            name = arn.rsplit(":", 1)[-1]
            if not name.startswith(config.name + "-"):
                continue
            tags = tag_dict(sns.list_tags_for_resource(ResourceArn=arn).get("Tags"))
            if tags.get(key) == value:
                topics.append(Resource("sns_topic", name, {}, arn=arn))
    iam = clients("iam")
    roles = []
    for page in iam.get_paginator("list_roles").paginate(PathPrefix=ROLE_PATH):
        for role in page["Roles"]:
            tags = tag_dict(iam.list_role_tags(RoleName=role["RoleName"]).get("Tags"))
            if tags.get(key) == value:
                roles.append(Resource("iam_role", role["RoleName"], {}, arn=role["Arn"]))
    notes: list[str] = []
    data = _discover_data(clients, config, delete_data) if config.bucket else []
    bucket_goes = any(r.kind == "s3_bucket" for r in data)
    logs = _discover_log_groups(clients, config, key, value, delete_data, notes)
    rules = _discover_rules(clients, config, delete_data, bucket_goes, notes)
    kms = _discover_key(clients, config, delete_data, bucket_goes, notes)
    found = [
        *scaling,
        *alarms,
        *ours["endpoint"],
        *ours["endpoint_config"],
        *ours["sagemaker_model"],
        *topics,
        *roles,
        *logs,
        *data,
        *rules,
        *kms,
    ]
    return found, notes


def _discover_log_groups(
    clients: Clients, config: DeployConfig, key: str, value: str, delete_data: bool, notes: list
) -> list[Resource]:
    found = []
    for endpoint in (config.mme_endpoint_name, config.training_endpoint_name):
        group = _find_log_group(clients, log_group_name(endpoint))
        if group is None:
            continue
        arn = _log_group_arn(group)
        if (
            clients("logs").list_tags_for_resource(resourceArn=arn).get("tags", {}).get(key)
            != value
        ):
            continue
        if delete_data:
            found.append(Resource("log_group", group["logGroupName"], {}, arn=arn))
        else:
            days = group.get("retentionInDays")
            until = f"expire after {days} days" if days else "never expire"
            notes.append(
                f"log group {group['logGroupName']} kept: it is data (user and job ids); its "
                f"events {until}; --delete-data deletes it"
            )
    return found


def _discover_rules(
    clients: Clients, config: DeployConfig, delete_data: bool, bucket_goes: bool, notes: list
) -> list[Resource]:
    if not config.bucket or bucket_goes:
        return []
    try:
        rules = lifecycle_rules(clients("s3"), config.bucket)
    except Exception as exc:
        if is_missing(exc):
            return []
        raise
    ours = set(lifecycle_rule_ids(config))
    if not any(r.get("ID") in ours for r in rules):
        return []
    name = f"s3://{config.bucket}/{config.prefix}"
    if not delete_data:
        notes.append(
            f"the lifecycle rules of {name} stay: they expire the photos and job files that stay "
            "(--delete-data deletes both)"
        )
        return []
    return [Resource("s3_lifecycle", name, {"Bucket": config.bucket, "Rules": []})]


def _discover_key(
    clients: Clients, config: DeployConfig, delete_data: bool, bucket_goes: bool, notes: list
) -> list[Resource]:
    found = _read_one(clients, Resource("kms_key", config.kms_alias, {}), {})
    ours = found is not None and (found.tags or {}).get(config.tag["Key"]) == config.tag["Value"]
    if not ours or found.attrs.get("_State") == "PendingDeletion":
        return []
    if not delete_data:
        notes.append(
            f"KMS key {config.kms_alias} kept: it encrypts the data that stays (--delete-data "
            "deletes the data, then schedules the key's deletion)"
        )
        return []
    if config.bucket and not bucket_goes and _bucket_uses_key(clients, config.bucket, found.arn):
        notes.append(
            f"KMS key {config.kms_alias} kept: bucket {config.bucket} stays and its default "
            "encryption uses the key (objects outside the prefix may be encrypted with it)"
        )
        return []
    return [Resource("kms_key", config.kms_alias, {}, arn=found.arn)]


def _bucket_uses_key(clients: Clients, bucket: str, key_arn: str) -> bool:
    found = _read_one(clients, Resource("s3_bucket_encryption", bucket, {"Bucket": bucket}), {})
    if found is None:
        return False
    key_id = key_arn.rsplit("/", 1)[-1]
    for rule in found.attrs["Rules"]:
        given = rule.get("ApplyServerSideEncryptionByDefault", {}).get("KMSMasterKeyID", "")
        if given in (key_arn, key_id) or "alias/" in given:  # an alias may name it: kept
            return True
    return False


def _discover_data(clients: Clients, config: DeployConfig, delete_data: bool) -> list[Resource]:
    if not delete_data:
        return []
    s3 = clients("s3")
    try:
        s3.head_bucket(Bucket=config.bucket)
    except Exception as exc:
        if is_missing(exc):
            return []
        raise
    count = sum(
        page.get("KeyCount", 0)
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=config.bucket, Prefix=config.prefix
        )
    )
    found = []
    if count:
        prefix = f"s3://{config.bucket}/{config.prefix}"
        found.append(
            Resource(
                "s3_prefix",
                prefix,
                {"Bucket": config.bucket, "Prefix": config.prefix, "objects": count},
            )
        )
    bucket = _read_one(clients, Resource("s3_bucket", config.bucket, {}), {})
    ours = bucket is not None and (bucket.tags or {}).get(config.tag["Key"]) == config.tag["Value"]
    if ours and not _holds_others(s3, config.bucket, config.prefix):
        found.append(Resource("s3_bucket", config.bucket, {"Bucket": config.bucket}))
    return found


def _holds_others(s3: Any, bucket: str, prefix: str) -> bool:
    """Does the bucket hold any object outside ``prefix`` (then it is kept)?"""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        if any(not o["Key"].startswith(prefix) for o in page.get("Contents", [])):
            return True
    return False
