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
    assert len(done) == 8, done  # bucket, 2 objects, model, config, endpoint, target, policy

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
    assert tracking["TargetValue"] == 60

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
    (alarm,) = boto3.client("cloudwatch").describe_alarms(AlarmNamePrefix="avatarforge-")[
        "MetricAlarms"
    ]
    assert alarm["MetricName"] == "HasBacklogWithoutCapacity"
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == (
        "GreaterThanOrEqualToThreshold",
        1.0,
    )
    assert alarm["AlarmActions"] == [step["PolicyARN"]]  # the alarm wakes the endpoint

    again, clients = deploy("training", cfg)
    assert again == [] and clients.mutations == []


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
