"""deploy mme / training / destroy against a real moto server (extended: ml.g5.*, UpdateEndpoint).

What this proves and what it cannot: moto stores what deploy creates and answers describe/list
calls like AWS, so the resources, their attributes, tags, idempotence and the update path are
checked for real. Nothing runs in moto: no endpoint starts a container, no alarm fires, no
autoscaling happens, and IAM policies are stored but not enforced.
"""

from __future__ import annotations

import dataclasses

import boto3
import pytest
from fixtures.deploy import ACCOUNT, TEST_BUCKET, TRAINING_IMAGE
from typer.testing import CliRunner

from avatarforge.cli import app
from avatarforge.deploy import DeployConfig, execute, make_plan
from avatarforge.deploy.aws import Clients
from avatarforge.serving import bootstrap

pytestmark = pytest.mark.integration
runner = CliRunner()
MUTATING = ("Create", "Update", "Put", "Register", "Deregister", "Delete", "Tag", "Upload")


class RecordingClients(Clients):
    """Clients of one boto3 session that record the name of every API operation they call."""

    def __init__(self, region: str = "us-east-1") -> None:
        session = boto3.Session(region_name=region)
        super().__init__(session)
        self.calls: list[str] = []
        session.events.register("before-call", self._record)

    def _record(self, model, **_kwargs) -> None:
        self.calls.append(model.name)

    @property
    def mutations(self) -> list[str]:
        return [c for c in self.calls if c.startswith(MUTATING)]


def deploy(command: str, config: DeployConfig, **kwargs) -> tuple[list[str], RecordingClients]:
    clients = RecordingClients(config.region)
    plan = make_plan(command, config, clients, **kwargs)
    assert not plan.blockers, plan.blockers
    return execute(plan, clients, config), clients


def tags_of(sm, arn: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=arn)["Tags"]}


def test_mme_deploy_creates_everything_then_is_a_no_op_then_updates_in_place(
    deploy_aws, deploy_config
):
    cfg = deploy_config
    done, _ = deploy("mme", cfg)
    # bucket, lifecycle rules, 2 objects, log group, model, config, endpoint, target, policy,
    # the alarm topic and 5 alarms
    assert len(done) == 16, done

    s3 = boto3.client("s3")
    shared = s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix="avatarforge/shared/")["Contents"]
    keys = sorted(o["Key"] for o in shared)
    assert [k.split("/")[-1].split("-")[0] for k in keys] == ["base", "env"]
    for key in keys:
        sha = s3.head_object(Bucket=TEST_BUCKET, Key=key)["Metadata"]["sha256"]
        assert len(sha) == 64 and sha in key  # the sha256 is in the key and in the metadata
    env_key = next(k for k in keys if "/env-" in k)
    assert "/env-py3.12-" in env_key

    sm = boto3.client("sagemaker")
    endpoint = sm.describe_endpoint(EndpointName="avatarforge-mme")
    assert endpoint["EndpointStatus"] == "InService"
    ec = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    (variant,) = ec["ProductionVariants"]
    assert variant["InstanceType"] == "ml.g5.2xlarge"  # the product default, not a moto type
    assert variant["InitialInstanceCount"] == 1
    # NVIDIA driver 580 / CUDA 13.0: the serving env's CUDA 13 torch needs it (moto keeps it)
    assert variant["InferenceAmiVersion"] == "al2023-ami-sagemaker-inference-gpu-4-1"
    model = sm.describe_model(ModelName=variant["ModelName"])
    container = model["PrimaryContainer"]
    assert container["Mode"] == "MultiModel"
    assert container["ModelDataUrl"] == f"s3://{TEST_BUCKET}/avatarforge/models/"
    assert container["Image"] == (
        "763104351884.dkr.ecr.us-east-1.amazonaws.com/sagemaker-tritonserver:25.09-py3"
    )
    env = container["Environment"]
    base_key = next(k for k in keys if "/base-" in k)
    assert env[bootstrap.ENV_BASE_SOURCE] == f"s3://{TEST_BUCKET}/{base_key}"
    assert env[bootstrap.ENV_ENV_SOURCE] == f"s3://{TEST_BUCKET}/{env_key}"
    assert env[bootstrap.ENV_ENV_SHA256] in env_key
    assert env[bootstrap.ENV_ENV_PYTHON] == "3.12"
    assert env[bootstrap.ENV_SHARED_DIR] == cfg.shared_dir
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["SAGEMAKER_TRITON_PING_MODE"] == "live"  # see test_deploy_serve_script.py
    assert env["SAGEMAKER_TRITON_LOG_VERBOSE"] == "0"
    assert model["ExecutionRoleArn"] == cfg.role_arn
    for arn in (endpoint["EndpointArn"], ec["EndpointConfigArn"], model["ModelArn"]):
        assert tags_of(sm, arn) == {"avatarforge:deployment": "avatarforge"}

    aas = boto3.client("application-autoscaling")
    rid = "endpoint/avatarforge-mme/variant/AllTraffic"
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[rid])[
        "ScalableTargets"
    ]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 4)
    (policy,) = aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=rid)[
        "ScalingPolicies"
    ]
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == (
        "SageMakerVariantInvocationsPerInstance"
    )
    assert tracking["TargetValue"] == 15  # 75% of an A10G's estimated 20.1 images a minute

    # the same deployment again: everything unchanged, and no call that changes anything
    again, clients = deploy("mme", cfg)
    assert again == []
    assert clients.mutations == []
    assert "DescribeEndpoint" in clients.calls  # it did look
    assert (
        sm.describe_endpoint(EndpointName="avatarforge-mme")["LastModifiedTime"]
        == (endpoint["LastModifiedTime"])
    )

    # a bigger instance: a new endpoint config, the endpoint updated in place, the old config
    # deleted, autoscaling re-registered (SageMaker refuses a type change under autoscaling)
    bigger = dataclasses.replace(cfg, mme_instance_type="ml.g5.4xlarge")
    done, clients = deploy("mme", bigger)
    assert "UpdateEndpoint" in clients.mutations and "CreateEndpoint" not in clients.mutations
    assert clients.mutations.index("DeregisterScalableTarget") < clients.mutations.index(
        "UpdateEndpoint"
    )
    updated = sm.describe_endpoint(EndpointName="avatarforge-mme")
    assert updated["EndpointArn"] == endpoint["EndpointArn"]
    assert updated["EndpointConfigName"] != endpoint["EndpointConfigName"]
    new_ec = sm.describe_endpoint_config(EndpointConfigName=updated["EndpointConfigName"])
    assert new_ec["ProductionVariants"][0]["InstanceType"] == "ml.g5.4xlarge"
    assert new_ec["ProductionVariants"][0]["ModelName"] == variant["ModelName"]  # same model
    names = [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]]
    assert names == [updated["EndpointConfigName"]]  # the superseded one is gone
    assert f"delete endpoint_config {endpoint['EndpointConfigName']}" in done
    assert aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[rid])[
        "ScalableTargets"
    ]
    assert len(aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]) == 1

    # more instances only: the scalable target changes, the endpoint does not
    wider = dataclasses.replace(bigger, mme_max_instances=8)
    done, clients = deploy("mme", wider)
    assert done == [f"update scalable_target {rid}"]
    assert clients.mutations == ["RegisterScalableTarget"]
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[rid])[
        "ScalableTargets"
    ]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 8)


def test_training_deploy_async_endpoint_scales_to_zero(deploy_aws, deploy_config):
    cfg = deploy_config
    deploy("training", cfg)
    sm = boto3.client("sagemaker")
    endpoint = sm.describe_endpoint(EndpointName="avatarforge-training")
    ec = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    topic = f"arn:aws:sns:us-east-1:{ACCOUNT}:avatarforge-training-"
    assert ec["AsyncInferenceConfig"] == {
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 2},
        "OutputConfig": {
            "S3OutputPath": f"s3://{TEST_BUCKET}/avatarforge/async/out/",
            "S3FailurePath": f"s3://{TEST_BUCKET}/avatarforge/async/failed/",
            "NotificationConfig": {
                "SuccessTopic": topic + "succeeded",
                "ErrorTopic": topic + "failed",
            },
        },
    }
    (variant,) = ec["ProductionVariants"]
    assert variant["InstanceType"] == "ml.g5.2xlarge"
    assert variant["InferenceAmiVersion"] == "al2023-ami-sagemaker-inference-gpu-4-1"  # cu130
    model = sm.describe_model(ModelName=variant["ModelName"])
    assert model["PrimaryContainer"]["Image"] == TRAINING_IMAGE
    env = model["PrimaryContainer"]["Environment"]
    base_uri = env["AVATARFORGE_SERVICE_BASE_SOURCE"]
    assert base_uri.startswith(f"s3://{TEST_BUCKET}/avatarforge/shared/base-")
    assert env["AVATARFORGE_SERVICE_MAX_CONCURRENT_JOBS"] == "2"
    assert env["AVATARFORGE_SERVICE_DEADLINE_S"] == "3300"  # 3600 s timeout less 300 s margin
    assert env["AVATARFORGE_SERVICE_SHARED_DIR"] == cfg.shared_dir

    sns = boto3.client("sns")
    for suffix in ("succeeded", "failed"):
        tags = sns.list_tags_for_resource(ResourceArn=topic + suffix)["Tags"]
        assert {"Key": "avatarforge:deployment", "Value": "avatarforge"} in tags

    aas = boto3.client("application-autoscaling")
    rid = "endpoint/avatarforge-training/variant/AllTraffic"
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[rid])[
        "ScalableTargets"
    ]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (0, 2)
    policies = {
        p["PolicyType"]: p
        for p in aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=rid)[
            "ScalingPolicies"
        ]
    }
    metric = policies["TargetTrackingScaling"]["TargetTrackingScalingPolicyConfiguration"][
        "CustomizedMetricSpecification"
    ]
    assert metric["MetricName"] == "ApproximateBacklogSizePerInstance"
    assert metric["Namespace"] == "AWS/SageMaker"
    assert metric["Dimensions"] == [{"Name": "EndpointName", "Value": "avatarforge-training"}]
    step = policies["StepScaling"]
    assert step["StepScalingPolicyConfiguration"]["StepAdjustments"] == [
        {"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}
    ]
    (alarm,) = boto3.client("cloudwatch").describe_alarms(
        AlarmNamePrefix="avatarforge-training-has-backlog"
    )["MetricAlarms"]
    assert alarm["MetricName"] == "HasBacklogWithoutCapacity"
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == (
        "GreaterThanOrEqualToThreshold",
        1.0,
    )
    assert alarm["AlarmActions"] == [step["PolicyARN"]]  # the alarm wakes the endpoint

    again, clients = deploy("training", cfg)
    assert again == [] and clients.mutations == []


@pytest.mark.smoke
def test_training_needs_an_image_and_mme_refuses_an_env_for_another_python(
    deploy_aws, deploy_config, env_tarball
):
    result = runner.invoke(
        app, ["deploy", "training", "--bucket", TEST_BUCKET, "--base", deploy_config.base,
              "--role-arn", deploy_config.role_arn],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "training_image_uri is empty" in result.output
    wrong = env_tarball("3.11")
    result = runner.invoke(
        app,
        ["deploy", "mme", "--bucket", TEST_BUCKET, "--base", deploy_config.base,
         "--role-arn", deploy_config.role_arn, "--env-tarball", str(wrong)],
    )  # fmt: skip
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "built for Python 3.11" in out and "Python 3.12" in out
    assert "conda_envs/build_in_image.sh 25.09-py3" in out
    buckets = boto3.client("s3").list_buckets()["Buckets"]
    assert buckets == []  # refused before anything was made


def test_deploy_refuses_to_touch_a_same_named_resource_that_is_not_ours(deploy_aws, deploy_config):
    sm = boto3.client("sagemaker")
    sm.create_model(
        ModelName="someone-elses",
        PrimaryContainer={"Image": "x"},
        ExecutionRoleArn=deploy_config.role_arn,
    )
    sm.create_endpoint_config(
        EndpointConfigName="someone-elses",
        ProductionVariants=[
            {"VariantName": "A", "ModelName": "someone-elses", "InstanceType": "ml.m5.large",
             "InitialInstanceCount": 1}
        ],
    )  # fmt: skip
    sm.create_endpoint(EndpointName="avatarforge-mme", EndpointConfigName="someone-elses")
    plan = make_plan("mme", deploy_config, RecordingClients())
    (blocker,) = plan.blockers
    assert "endpoint avatarforge-mme" in blocker and "not tagged" in blocker


def test_destroy_removes_only_what_carries_our_tag(deploy_aws, deploy_config):
    cfg = dataclasses.replace(deploy_config, role_arn="")
    deploy("mme", cfg, create_role=True)
    deploy("training", cfg, create_role=True)
    again, clients = deploy("mme", cfg, create_role=True)  # roles and their policies compared
    assert again == [] and clients.mutations == []
    iam = boto3.client("iam")
    role = iam.get_role(RoleName="avatarforge-mme")["Role"]
    assert role["Path"] == "/avatarforge/"
    assert {"Key": "avatarforge:deployment", "Value": "avatarforge"} in iam.list_role_tags(
        RoleName="avatarforge-mme"
    )["Tags"]
    sm = boto3.client("sagemaker")
    model_name = sm.describe_endpoint_config(
        EndpointConfigName=sm.describe_endpoint(EndpointName="avatarforge-mme")[
            "EndpointConfigName"
        ]
    )["ProductionVariants"][0]["ModelName"]
    assert sm.describe_model(ModelName=model_name)["ExecutionRoleArn"] == role["Arn"]

    # foreign things of the same kinds, some with our name prefix, one of another deployment
    sm.create_model(
        ModelName="avatarforge-mme-foreign",
        PrimaryContainer={"Image": "x"},
        ExecutionRoleArn=role["Arn"],
    )
    sm.create_model(
        ModelName="avatarforge-mme-other-deployment",
        PrimaryContainer={"Image": "x"},
        ExecutionRoleArn=role["Arn"],
        Tags=[{"Key": "avatarforge:deployment", "Value": "avatarforge-other"}],
    )
    sm.create_endpoint_config(
        EndpointConfigName="avatarforge-foreign",
        ProductionVariants=[
            {"VariantName": "A", "ModelName": "avatarforge-mme-foreign",
             "InstanceType": "ml.g5.2xlarge", "InitialInstanceCount": 1}
        ],
    )  # fmt: skip
    sm.create_endpoint(EndpointName="avatarforge-foreign", EndpointConfigName="avatarforge-foreign")
    sns = boto3.client("sns")
    foreign_topic = sns.create_topic(Name="avatarforge-foreign")["TopicArn"]
    cw = boto3.client("cloudwatch")
    cw.put_metric_alarm(
        AlarmName="avatarforge-foreign", MetricName="CPU", Namespace="X", Statistic="Average",
        Period=60, EvaluationPeriods=1, Threshold=1.0, ComparisonOperator="GreaterThanThreshold",
    )  # fmt: skip
    iam.create_role(
        RoleName="avatarforge-foreign", Path="/avatarforge/", AssumeRolePolicyDocument="{}"
    )
    s3 = boto3.client("s3")
    s3.put_object(Bucket=TEST_BUCKET, Key="elsewhere/keep.txt", Body=b"not ours")
    s3.put_object(Bucket=TEST_BUCKET, Key="avatarforge/models/alice.tar.gz", Body=b"user model")

    listing = runner.invoke(app, ["deploy", "destroy", "--dry-run", "--bucket", TEST_BUCKET])
    assert listing.exit_code == 0, listing.output
    assert sm.list_endpoints()["Endpoints"] and "delete" in listing.output  # listed, not removed

    result = runner.invoke(app, ["deploy", "destroy", "--bucket", TEST_BUCKET])
    assert result.exit_code == 0, result.output
    assert [e["EndpointName"] for e in sm.list_endpoints()["Endpoints"]] == ["avatarforge-foreign"]
    assert [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]] == [
        "avatarforge-foreign"
    ]
    assert sorted(m["ModelName"] for m in sm.list_models()["Models"]) == [
        "avatarforge-mme-foreign",
        "avatarforge-mme-other-deployment",
    ]
    assert [t["TopicArn"] for t in sns.list_topics()["Topics"]] == [foreign_topic]
    assert [a["AlarmName"] for a in cw.describe_alarms()["MetricAlarms"]] == ["avatarforge-foreign"]
    aas = boto3.client("application-autoscaling")
    assert aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []
    assert [r["RoleName"] for r in iam.list_roles(PathPrefix="/avatarforge/")["Roles"]] == [
        "avatarforge-foreign"
    ]
    # data stays without --delete-data
    assert s3.head_object(Bucket=TEST_BUCKET, Key="avatarforge/models/alice.tar.gz")

    result = runner.invoke(app, ["deploy", "destroy", "--bucket", TEST_BUCKET, "--delete-data"])
    assert result.exit_code == 0, result.output
    left = [o["Key"] for o in s3.list_objects_v2(Bucket=TEST_BUCKET)["Contents"]]
    assert left == ["elsewhere/keep.txt"]  # the bucket holds foreign data: it stays


def test_destroy_delete_data_removes_the_bucket_deploy_created(deploy_aws, deploy_config):
    deploy("mme", deploy_config)
    result = runner.invoke(app, ["deploy", "destroy", "--bucket", TEST_BUCKET, "--delete-data"])
    assert result.exit_code == 0, result.output
    assert boto3.client("s3").list_buckets()["Buckets"] == []


# ---------------------------------------------------------------- retention, operations, security

SUBNETS = "subnet-0123456789abcdef0,subnet-0123456789abcdef1"
GROUPS = "sg-0123456789abcdef0"
MME_LOGS = "/aws/sagemaker/Endpoints/avatarforge-mme"
TRAINING_LOGS = "/aws/sagemaker/Endpoints/avatarforge-training"
TAG = {"avatarforge:deployment": "avatarforge"}


def _lifecycle(s3) -> dict[str, dict]:
    rules = s3.get_bucket_lifecycle_configuration(Bucket=TEST_BUCKET)["Rules"]
    return {r["ID"]: r for r in rules}


def _log_group(logs, name: str) -> dict | None:
    found = logs.describe_log_groups(logGroupNamePrefix=name)["logGroups"]
    return next((g for g in found if g["logGroupName"] == name), None)


def test_retention_log_groups_alarms_and_subscriptions_are_kept_in_step(deploy_aws, deploy_config):
    s3, logs, sns = boto3.client("s3"), boto3.client("logs"), boto3.client("sns")
    # the operator's bucket, with a rule of its own; SageMaker made the MME's log group before
    # deploy set retentions (an older deployment): it keeps events for ever
    s3.create_bucket(Bucket=TEST_BUCKET)
    owners = {"ID": "owners-rule", "Filter": {"Prefix": "logs/"}, "Status": "Enabled",
              "Expiration": {"Days": 90}}  # fmt: skip
    s3.put_bucket_lifecycle_configuration(
        Bucket=TEST_BUCKET, LifecycleConfiguration={"Rules": [owners]}
    )
    logs.create_log_group(logGroupName=MME_LOGS)
    sqs = boto3.client("sqs")
    queue = sqs.create_queue(QueueName="alarms")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    cfg = dataclasses.replace(deploy_config, alarm_subscriptions=f"ops@example.com,{queue_arn}")
    deploy("mme", cfg)
    deploy("training", cfg)

    rules = _lifecycle(s3)
    assert rules["owners-rule"]["Expiration"] == {"Days": 90}  # theirs, untouched
    ours = {k: v for k, v in rules.items() if k.startswith("avatarforge:avatarforge:")}
    assert sorted(r["Filter"]["Prefix"] for r in ours.values()) == [
        "avatarforge/async/failed/", "avatarforge/async/out/", "avatarforge/jobs/",
        "avatarforge/photos/",
    ]  # fmt: skip
    assert {r["Expiration"]["Days"] for r in ours.values()} == {7}
    for name in (MME_LOGS, TRAINING_LOGS):
        group = _log_group(logs, name)
        assert group["retentionInDays"] == 30
        tags = logs.list_tags_for_resource(resourceArn=group["logGroupArn"])["tags"]
        assert tags == TAG  # the MME's, made by SageMaker, is the deployment's from now on

    cw = boto3.client("cloudwatch")
    topic = f"arn:aws:sns:us-east-1:{ACCOUNT}:avatarforge-alarms"
    alarms = {a["AlarmName"]: a for a in cw.describe_alarms(AlarmNamePrefix="avatarforge-")[
        "MetricAlarms"]}  # fmt: skip
    notifying = sorted(n for n, a in alarms.items() if a["AlarmActions"] == [topic])
    assert notifying == [
        "avatarforge-mme-5xx-errors", "avatarforge-mme-gpu-memory", "avatarforge-mme-memory",
        "avatarforge-mme-model-latency", "avatarforge-mme-model-loading-wait",
        "avatarforge-training-backlog-age", "avatarforge-training-failed-jobs",
    ]  # fmt: skip
    assert alarms["avatarforge-mme-model-latency"]["ExtendedStatistic"] == "p90"
    assert alarms["avatarforge-mme-memory"]["OKActions"] == [topic]
    subscribed = sorted(
        (s["Protocol"], s["Endpoint"])
        for s in sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
    )
    assert subscribed == [("email", "ops@example.com"), ("sqs", queue_arn)]

    # a week longer, logs for 90 days, the email dropped: exactly those changes are made
    changed = dataclasses.replace(
        cfg, retention_days=14, log_retention_days=90, alarm_subscriptions=queue_arn
    )
    done, clients = deploy("training", changed)
    assert sorted(done) == [
        "delete sns_subscription email:ops@example.com",
        f"update log_group {TRAINING_LOGS}",
        f"update s3_lifecycle s3://{TEST_BUCKET}/avatarforge/",
    ]
    assert "CreateEndpointConfig" not in clients.mutations
    rules = _lifecycle(s3)
    assert rules["owners-rule"]["Expiration"] == {"Days": 90}
    assert rules["avatarforge:avatarforge:avatarforge/photos/"]["Expiration"] == {"Days": 14}
    assert _log_group(logs, TRAINING_LOGS)["retentionInDays"] == 90
    assert [s["Protocol"] for s in sns.list_subscriptions_by_topic(TopicArn=topic)[
        "Subscriptions"]] == ["sqs"]  # fmt: skip

    # destroy: what protects or holds data stays (log groups, the rules that expire it)
    result = runner.invoke(app, ["deploy", "destroy", "--bucket", TEST_BUCKET])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"log group {MME_LOGS} kept" in text and "lifecycle rules" in text
    assert cw.describe_alarms(AlarmNamePrefix="avatarforge-")["MetricAlarms"] == []
    assert sns.list_topics()["Topics"] == []  # subscriptions went with the topic
    assert _log_group(logs, MME_LOGS) and len(_lifecycle(s3)) == 5
    # with the data: the log groups and the deployment's rules go; the owner's rule stays
    result = runner.invoke(app, ["deploy", "destroy", "--bucket", TEST_BUCKET, "--delete-data"])
    assert result.exit_code == 0, result.output
    assert _log_group(logs, MME_LOGS) is None and _log_group(logs, TRAINING_LOGS) is None
    assert list(_lifecycle(s3)) == ["owners-rule"]


def test_a_kms_key_deploy_makes_encrypts_everything_and_goes_only_with_the_data(
    deploy_aws, deploy_config
):
    cfg = dataclasses.replace(
        deploy_config, role_arn="", kms_key="create", vpc_subnets=SUBNETS,
        vpc_security_groups=GROUPS,
    )  # fmt: skip
    deploy("mme", cfg, create_role=True)
    deploy("training", cfg, create_role=True)
    kms, s3, sm, sns = (boto3.client(s) for s in ("kms", "s3", "sagemaker", "sns"))
    key = kms.describe_key(KeyId="alias/avatarforge/avatarforge")["KeyMetadata"]
    assert key["KeyState"] == "Enabled"
    assert {"TagKey": "avatarforge:deployment", "TagValue": "avatarforge"} in (
        kms.list_resource_tags(KeyId=key["KeyId"])["Tags"]
    )
    default = s3.get_bucket_encryption(Bucket=TEST_BUCKET)["ServerSideEncryptionConfiguration"]
    assert default["Rules"][0]["ApplyServerSideEncryptionByDefault"] == {
        "SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key["Arn"]}  # fmt: skip
    shared = s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix="avatarforge/shared/")["Contents"]
    head = s3.head_object(Bucket=TEST_BUCKET, Key=shared[0]["Key"])
    assert head["SSEKMSKeyId"] == key["Arn"]  # uploaded after the bucket's default was set
    for name in ("avatarforge-mme", "avatarforge-training"):
        ec = sm.describe_endpoint_config(
            EndpointConfigName=sm.describe_endpoint(EndpointName=name)["EndpointConfigName"]
        )
        assert ec["KmsKeyId"] == key["Arn"]
        model = sm.describe_model(ModelName=ec["ProductionVariants"][0]["ModelName"])
        assert model["VpcConfig"]["Subnets"] == cfg.subnets
        assert model["VpcConfig"]["SecurityGroupIds"] == [GROUPS]
        assert model.get("EnableNetworkIsolation") in (None, False)  # see the plan's reason
    assert ec["AsyncInferenceConfig"]["OutputConfig"]["KmsKeyId"] == key["Arn"]
    for topic in sns.list_topics()["Topics"]:
        attributes = sns.get_topic_attributes(TopicArn=topic["TopicArn"])["Attributes"]
        assert attributes["KmsMasterKeyId"] == key["Arn"]
    policy = boto3.client("iam").get_role_policy(
        RoleName="avatarforge-training", PolicyName="avatarforge-least-privilege"
    )["PolicyDocument"]
    (use,) = [s for s in policy["Statement"] if s["Sid"] == "UseTheDeploymentKey"]
    assert use["Resource"] == [key["Arn"]]  # the reference resolved to the key made
    again, clients = deploy("mme", cfg, create_role=True)
    assert again == [] and clients.mutations == []

    result = runner.invoke(app, ["deploy", "destroy", "--bucket", TEST_BUCKET])
    assert result.exit_code == 0, result.output
    assert "KMS key alias/avatarforge/avatarforge kept" in " ".join(result.output.split())
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "Enabled"
    result = runner.invoke(app, ["deploy", "destroy", "--bucket", TEST_BUCKET, "--delete-data"])
    assert result.exit_code == 0, result.output
    assert s3.list_buckets()["Buckets"] == []
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "PendingDeletion"
    assert kms.list_aliases(KeyId=key["KeyId"])["Aliases"] == []  # a new deploy makes a new key


def test_a_foreign_buckets_encryption_and_a_given_key_are_never_changed(deploy_aws, deploy_config):
    kms, s3 = boto3.client("kms"), boto3.client("s3")
    mine = kms.create_key(Description="the operator's")["KeyMetadata"]
    s3.create_bucket(Bucket=TEST_BUCKET)
    s3.put_bucket_encryption(
        Bucket=TEST_BUCKET,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )
    cfg = dataclasses.replace(deploy_config, kms_key=mine["Arn"])
    plan = make_plan("mme", cfg, RecordingClients())
    (blocker,) = plan.blockers
    assert f"s3_bucket_encryption {TEST_BUCKET}" in blocker and "its owner's" in blocker
    s3.put_bucket_encryption(  # the owner sets the key as the bucket's default: deploy goes on
        Bucket=TEST_BUCKET,
        ServerSideEncryptionConfiguration={"Rules": [{
            "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms",
                                                   "KMSMasterKeyID": mine["Arn"]},
            "BucketKeyEnabled": True}]},
    )  # fmt: skip
    done, clients = deploy("mme", cfg)
    assert "PutBucketEncryption" not in clients.mutations and not any("kms" in d for d in done)
    result = runner.invoke(app, ["deploy", "destroy", "--bucket", TEST_BUCKET, "--delete-data"])
    assert result.exit_code == 0, result.output
    assert kms.describe_key(KeyId=mine["KeyId"])["KeyMetadata"]["KeyState"] == "Enabled"
    assert s3.get_bucket_encryption(Bucket=TEST_BUCKET)  # the bucket is the operator's: it stays
