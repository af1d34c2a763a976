"""Carry out a plan: one boto3 call (or a few) per resource, in the plan's order.

Nothing here prints: :func:`apply` reports each step to an optional ``progress`` callback and
returns the list of changes it made.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from .aws import Clients, DeployError, lifecycle_rules
from .config import DeployConfig
from .operations import lifecycle_rule_ids
from .plan import RESCALE_NOTE, SCALABLE_DIMENSION, Plan, Resource, variant_resource_id
from .security import KEY_DELETION_WINDOW_DAYS

Progress = Callable[[str], None]
ENDPOINT_WAIT = {"Delay": 30, "MaxAttempts": 120}  # endpoints take minutes; give up after 1 h
ROLE_PROPAGATION_S = 90  # a new IAM role may take a minute before SageMaker can assume it


class _Run:
    """One apply: the clients, the deployment, ARNs learned on the way, the log of changes."""

    def __init__(
        self, clients: Clients, config: DeployConfig, plan: Plan, progress: Progress | None
    ):
        self.clients = clients
        self.config = config
        self.plan = plan
        self.progress = progress or (lambda _message: None)
        self.tags = [dict(config.tag)]
        self.arns: dict[tuple[str, str], str] = {
            (r.kind, r.name): r.arn for r in plan.resources if r.arn
        }
        self.done: list[str] = []

    def say(self, r: Resource) -> None:
        line = f"{r.action} {r.kind} {r.name}"
        self.done.append(line)
        self.progress(line)

    def resolve(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
            kind, _, name = value[2:-1].partition(":")
            if (kind, name) not in self.arns:
                raise DeployError(f"{value}: the resource it names was not made")
            return self.arns[(kind, name)]
        return value

    # ---- per kind

    def s3_bucket(self, r: Resource) -> None:
        s3 = self.clients("s3")
        if r.action == "delete":
            s3.delete_bucket(Bucket=r.name)
            return
        extra = {}
        if r.attrs["Region"] != "us-east-1":  # us-east-1 refuses its own name as a constraint
            extra["CreateBucketConfiguration"] = {"LocationConstraint": r.attrs["Region"]}
        s3.create_bucket(Bucket=r.name, **extra)
        s3.put_bucket_tagging(Bucket=r.name, Tagging={"TagSet": self.tags})

    def s3_object(self, r: Resource) -> None:
        s3 = self.clients("s3")
        if r.action == "delete":
            s3.delete_object(Bucket=r.attrs["Bucket"], Key=r.attrs["Key"])
            return
        tagging = urllib.parse.urlencode({t["Key"]: t["Value"] for t in self.tags})
        s3.upload_file(
            r.attrs["source"],
            r.attrs["Bucket"],
            r.attrs["Key"],
            ExtraArgs={"Metadata": {"sha256": r.attrs["sha256"]}, "Tagging": tagging},
        )

    def s3_prefix(self, r: Resource) -> None:
        s3 = self.clients("s3")
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=r.attrs["Bucket"], Prefix=r.attrs["Prefix"]
        ):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                answer = s3.delete_objects(Bucket=r.attrs["Bucket"], Delete={"Objects": keys})
                if answer.get("Errors"):
                    raise DeployError(f"deleting under {r.name}: {answer['Errors'][:3]}")

    def iam_role(self, r: Resource) -> None:
        iam = self.clients("iam")
        if r.action == "delete":
            for name in iam.list_role_policies(RoleName=r.name)["PolicyNames"]:
                iam.delete_role_policy(RoleName=r.name, PolicyName=name)
            iam.delete_role(RoleName=r.name)
            return
        trust = json.dumps(r.attrs["AssumeRolePolicyDocument"])
        if r.action == "create":
            made = iam.create_role(
                RoleName=r.name,
                Path=r.attrs["Path"],
                AssumeRolePolicyDocument=trust,
                Description=f"SageMaker execution role of avatarforge {self.config.name}",
                Tags=self.tags,
            )
            self.arns[(r.kind, r.name)] = made["Role"]["Arn"]
        else:
            iam.update_assume_role_policy(RoleName=r.name, PolicyDocument=trust)
        iam.put_role_policy(
            RoleName=r.name,
            PolicyName=r.attrs["PolicyName"],
            PolicyDocument=json.dumps(self.resolve(r.attrs["PolicyDocument"])),
        )

    def sagemaker_model(self, r: Resource) -> None:
        sm = self.clients("sagemaker")
        if r.action == "delete":
            sm.delete_model(ModelName=r.name)
            return
        deadline = time.monotonic() + ROLE_PROPAGATION_S
        while True:
            try:
                sm.create_model(**self.resolve(r.attrs), Tags=self.tags)
                return
            except Exception as exc:  # a just-made role is not assumable for a while
                fresh_role = any(
                    x.kind == "iam_role" and x.action == "create" for x in self.plan.resources
                )
                if not (
                    fresh_role and "assume" in str(exc).lower() and time.monotonic() < deadline
                ):
                    raise
                time.sleep(5)

    def endpoint_config(self, r: Resource) -> None:
        sm = self.clients("sagemaker")
        if r.action == "delete":
            sm.delete_endpoint_config(EndpointConfigName=r.name)
            return
        sm.create_endpoint_config(**self.resolve(r.attrs), Tags=self.tags)

    def _wait_in_service(self, name: str) -> None:
        from botocore.exceptions import WaiterError

        self.progress(f"waiting for endpoint {name} to be InService (minutes on AWS)")
        try:
            self.clients("sagemaker").get_waiter("endpoint_in_service").wait(
                EndpointName=name, WaiterConfig=ENDPOINT_WAIT
            )
        except WaiterError as exc:
            found = self.clients("sagemaker").describe_endpoint(EndpointName=name)
            raise DeployError(
                f"endpoint {name} is {found.get('EndpointStatus')}: "
                f"{found.get('FailureReason', exc)} (its logs: CloudWatch log group "
                f"/aws/sagemaker/Endpoints/{name}; a Failed endpoint cannot be updated: "
                "`avatarforge deploy destroy`, then deploy again)"
            ) from exc

    def endpoint(self, r: Resource) -> None:
        sm = self.clients("sagemaker")
        if r.action == "delete":
            sm.delete_endpoint(EndpointName=r.name)
            return
        if r.action == "create":
            sm.create_endpoint(**r.attrs, Tags=self.tags)
        else:
            self._wait_in_service(r.name)  # an update needs a settled endpoint
            if any(
                x.kind == "scalable_target" and RESCALE_NOTE in x.changes
                for x in self.plan.resources
                if x.name == variant_resource_id(r.name)
            ):
                self._deregister_scaling(variant_resource_id(r.name))
            sm.update_endpoint(**r.attrs)
        self._wait_in_service(r.name)

    def _deregister_scaling(self, resource_id: str) -> None:
        aas = self.clients("application-autoscaling")
        policies = aas.describe_scaling_policies(
            ServiceNamespace="sagemaker",
            ResourceId=resource_id,
            ScalableDimension=SCALABLE_DIMENSION,
        )["ScalingPolicies"]
        for p in policies:
            aas.delete_scaling_policy(
                PolicyName=p["PolicyName"],
                ServiceNamespace="sagemaker",
                ResourceId=resource_id,
                ScalableDimension=SCALABLE_DIMENSION,
            )
        aas.deregister_scalable_target(
            ServiceNamespace="sagemaker",
            ResourceId=resource_id,
            ScalableDimension=SCALABLE_DIMENSION,
        )
        self.progress(f"deregistered autoscaling of {resource_id} for the instance type change")

    def scalable_target(self, r: Resource) -> None:
        aas = self.clients("application-autoscaling")
        if r.action == "delete":
            aas.deregister_scalable_target(
                ServiceNamespace="sagemaker",
                ResourceId=r.name,
                ScalableDimension=SCALABLE_DIMENSION,
            )
            return
        extra = {"Tags": {t["Key"]: t["Value"] for t in self.tags}} if r.action == "create" else {}
        aas.register_scalable_target(**r.attrs, **extra)

    def scaling_policy(self, r: Resource) -> None:
        aas = self.clients("application-autoscaling")
        if r.action == "delete":
            aas.delete_scaling_policy(
                PolicyName=r.name,
                ServiceNamespace="sagemaker",
                ResourceId=r.attrs["ResourceId"],
                ScalableDimension=SCALABLE_DIMENSION,
            )
            return
        made = aas.put_scaling_policy(**r.attrs)
        self.arns[(r.kind, r.name)] = made["PolicyARN"]

    def sns_topic(self, r: Resource) -> None:
        sns = self.clients("sns")
        if r.action == "delete":
            sns.delete_topic(TopicArn=r.arn)  # its subscriptions go with it
            return
        key = self.resolve(r.attrs.get("KmsMasterKeyId", ""))
        if r.action == "create":
            attributes = {"KmsMasterKeyId": key} if key else {}
            made = sns.create_topic(Name=r.name, Attributes=attributes, Tags=self.tags)
            self.arns[(r.kind, r.name)] = made["TopicArn"]
        else:  # '' turns server-side encryption off
            sns.set_topic_attributes(
                TopicArn=r.arn, AttributeName="KmsMasterKeyId", AttributeValue=key
            )

    def sns_subscription(self, r: Resource) -> None:
        sns = self.clients("sns")
        if r.action == "delete":
            sns.unsubscribe(SubscriptionArn=r.arn)
            return
        sns.subscribe(
            TopicArn=self.resolve(r.attrs["TopicArn"]),
            Protocol=r.attrs["Protocol"],
            Endpoint=r.attrs["Endpoint"],
            ReturnSubscriptionArn=True,  # email and https: pending until confirmed
        )

    def kms_key(self, r: Resource) -> None:
        kms = self.clients("kms")
        key = r.arn.rsplit("/", 1)[-1]  # the key id (moto 5.2.5 takes no ARN where AWS does)
        if r.action == "delete":
            kms.delete_alias(AliasName=r.name)  # a later deploy makes a new key
            kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=KEY_DELETION_WINDOW_DAYS)
            return
        policy = json.dumps(r.attrs["Policy"])
        if r.action == "create":
            made = kms.create_key(
                Description=r.attrs["Description"],
                Policy=policy,
                Tags=[{"TagKey": t["Key"], "TagValue": t["Value"]} for t in self.tags],
            )["KeyMetadata"]
            kms.create_alias(AliasName=r.name, TargetKeyId=made["KeyId"])
            self.arns[(r.kind, r.name)] = made["Arn"]
            return
        kms.put_key_policy(KeyId=key, PolicyName="default", Policy=policy)
        kms.update_key_description(KeyId=key, Description=r.attrs["Description"])

    def s3_bucket_encryption(self, r: Resource) -> None:
        self.clients("s3").put_bucket_encryption(
            Bucket=r.attrs["Bucket"],
            ServerSideEncryptionConfiguration={"Rules": self.resolve(r.attrs["Rules"])},
        )

    def s3_lifecycle(self, r: Resource) -> None:
        """Replace this deployment's rules (by ID) and keep every other rule of the bucket."""
        s3 = self.clients("s3")
        ours = set(lifecycle_rule_ids(self.config))
        now = lifecycle_rules(s3, r.attrs["Bucket"])
        rules = [x for x in now if x.get("ID") not in ours]
        rules += [] if r.action == "delete" else r.attrs["Rules"]
        if rules:
            s3.put_bucket_lifecycle_configuration(
                Bucket=r.attrs["Bucket"], LifecycleConfiguration={"Rules": rules}
            )
        elif now:
            s3.delete_bucket_lifecycle(Bucket=r.attrs["Bucket"])

    def log_group(self, r: Resource) -> None:
        logs = self.clients("logs")
        name = r.name
        if r.action == "delete":
            logs.delete_log_group(logGroupName=name)
            return
        tags = {t["Key"]: t["Value"] for t in self.tags}
        if r.action == "create":
            logs.create_log_group(logGroupName=name, tags=tags)
        elif r.arn:  # made by SageMaker before deploy set a retention: ours from now on
            logs.tag_resource(resourceArn=r.arn, tags=tags)
        if r.attrs["retentionInDays"]:
            logs.put_retention_policy(logGroupName=name, retentionInDays=r.attrs["retentionInDays"])
        elif r.action == "update":
            logs.delete_retention_policy(logGroupName=name)  # 0: never expire

    def cloudwatch_alarm(self, r: Resource) -> None:
        cw = self.clients("cloudwatch")
        if r.action == "delete":
            cw.delete_alarms(AlarmNames=[r.name])
            return
        cw.put_metric_alarm(**self.resolve(r.attrs), Tags=self.tags)


def apply(
    plan: Plan, clients: Clients, config: DeployConfig, *, progress: Progress | None = None
) -> list[str]:
    """Carry out every change of ``plan`` in order; returns what was done ("create endpoint x").

    Refuses a plan with blockers. Stops at the first failure (DeployError names the step);
    running deploy again continues from what exists.
    """
    from boto3.exceptions import Boto3Error  # S3 transfer failures
    from botocore.exceptions import BotoCoreError, ClientError

    if plan.blockers:
        raise DeployError("the plan has blockers:\n  " + "\n  ".join(plan.blockers))
    run = _Run(clients, config, plan, progress)
    for r in plan.changes:
        try:
            getattr(run, r.kind)(r)
        except (ClientError, BotoCoreError, Boto3Error, OSError) as exc:
            raise DeployError(f"{r.action} {r.kind} {r.name} failed: {exc}") from exc
        run.say(r)
    return run.done
