"""Deploy without AWS: image table, env tarball check, IAM policy shape, the plan, the dry run."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket

import pytest
from fixtures.deploy import ACCOUNT, TEST_BUCKET
from typer.testing import CliRunner

from avatarforge.cli import app
from avatarforge.deploy import (
    AssetError,
    DeployConfig,
    base_asset,
    env_asset,
    inspect_env_tarball,
    lmi_image_uri,
    mme_policy,
    plan_mme,
    plan_training,
    training_policy,
    triton_image_uri,
    triton_python,
    trust_policy,
)
from avatarforge.deploy.assets import MMEAssets
from avatarforge.deploy.plan import Existing
from avatarforge.deploy.policies import UNSCOPED_ACTIONS
from avatarforge.deploy.training import training_environment
from avatarforge.settings import ConfigError

runner = CliRunner()


# ---------------------------------------------------------------- images


def test_image_uris_come_from_the_sagemaker_sdk():
    assert triton_image_uri("us-east-1", "25.09-py3") == (
        "763104351884.dkr.ecr.us-east-1.amazonaws.com/sagemaker-tritonserver:25.09-py3"
    )
    assert triton_image_uri("af-south-1", "24.09-py3").startswith(
        "626614931356.dkr.ecr.af-south-1.amazonaws.com/"
    )
    # regions our old table refused, published with registries of their own
    assert triton_image_uri("mx-central-1", "25.09-py3") == (
        "637423239942.dkr.ecr.mx-central-1.amazonaws.com/sagemaker-tritonserver:25.09-py3"
    )
    assert lmi_image_uri("ap-southeast-5", "0.36.0-lmi27.0.0-cu130").startswith(
        "550225433462.dkr.ecr.ap-southeast-5.amazonaws.com/djl-inference:"
    )
    assert triton_image_uri("us-east-1", "25.09-py3", "ml.m5.xlarge").endswith(":25.09-py3-cpu")
    assert triton_python("24.09-py3") == "3.10"  # Ubuntu 22.04 images
    assert triton_python("25.09-py3") == "3.12"  # 24.11 and later: Ubuntu 24.04
    assert lmi_image_uri("eu-west-1", "0.36.0-lmi27.0.0-cu130") == (
        "763104351884.dkr.ecr.eu-west-1.amazonaws.com/djl-inference:0.36.0-lmi27.0.0-cu130"
    )


def test_a_tag_that_is_not_published_in_a_region_is_refused_naming_both():
    # 24.09 exists, but not in eu-central-2 (our old table said it did)
    with pytest.raises(ConfigError, match=r"triton_image_tag '24\.09-py3' in deploy\.region "
                       r"'eu-central-2': Unsupported region: eu-central-2"):  # fmt: skip
        triton_image_uri("eu-central-2", "24.09-py3")
    with pytest.raises(ConfigError, match=r"Unsupported sagemaker-tritonserver version: 22\.12"):
        plan_mme(DeployConfig(triton_image_tag="22.12-py3"), MMEAssets(None, None, "no env"))
    with pytest.raises(ConfigError, match=r"deploy\.region 'mars-1': Unsupported region: mars-1"):
        triton_image_uri("mars-1", "25.09-py3")
    with pytest.raises(ConfigError, match=r"is '0\.36\.0-lmi27\.0\.0-cu130', not '0\.36\.0-x'"):
        lmi_image_uri("us-east-1", "0.36.0-x")


def test_unknown_tag_shape_region_or_image_uri_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"deploy\.triton_image_tag: '25\.9' is not"):
        DeployConfig(triton_image_tag="25.9")
    with pytest.raises(ConfigError, match=r"deploy\.region: 'cn-north-1' is in the China"):
        DeployConfig(region="cn-north-1")
    with pytest.raises(ConfigError, match=r"deploy\.training_image_uri: not an ECR image URI"):
        DeployConfig(training_image_uri="docker.io/me/training:1")
    with pytest.raises(ConfigError, match=r"deploy\.training_timeout_s: must be >= 180"):
        DeployConfig(training_timeout_s=120)  # would leave the service no time to finish
    with pytest.raises(ConfigError, match=r"deploy\.training_request_ttl_s: must be <= 21600"):
        DeployConfig(training_request_ttl_s=86400)  # the API's maximum is 6 h


def test_both_endpoints_run_on_the_ami_with_the_driver_their_cuda_13_needs(deploy_config):
    from avatarforge.deploy.images import inference_ami_versions

    assets = _assets(deploy_config)
    for plan in (plan_mme(deploy_config, assets), plan_training(deploy_config, assets.base)):
        (config,) = [r for r in plan.resources if r.kind == "endpoint_config"]
        (variant,) = config.attrs["ProductionVariants"]
        assert variant["InferenceAmiVersion"] == "al2023-ami-sagemaker-inference-gpu-4-1"
        assert variant["InferenceAmiVersion"] in inference_ami_versions()  # botocore's enum
        assert plan.facts["inference_ami"] == "al2023-ami-sagemaker-inference-gpu-4-1"
    default = plan_mme(dataclasses.replace(deploy_config, inference_ami_version=""), assets)
    (config,) = [r for r in default.resources if r.kind == "endpoint_config"]
    assert "InferenceAmiVersion" not in config.attrs["ProductionVariants"][0]
    with pytest.raises(ConfigError, match=r"inference_ami_version: 'al2-gpu-9' .*gpu-4-1"):
        plan_mme(dataclasses.replace(deploy_config, inference_ami_version="al2-gpu-9"), assets)


# ---------------------------------------------------------------- serving env tarball


@pytest.mark.parametrize("layout", ["venv", "pyvenv", "conda"])
def test_env_python_is_read_from_the_tarball(env_tarball, layout):
    facts = inspect_env_tarball(env_tarball("3.12", layout=layout))
    assert facts.python == "3.12" and facts.has_activate
    asset = env_asset(env_tarball("3.12", layout=layout), "25.09-py3")
    assert asset.python == "3.12" and asset.name == f"env-py3.12-{asset.sha256}.tar.gz"


def test_env_for_another_python_is_refused_with_how_to_build_the_right_one(env_tarball):
    with pytest.raises(AssetError) as refused:
        env_asset(env_tarball("3.11"), "25.09-py3")
    message = str(refused.value)
    assert "built for Python 3.11" in message and "Python 3.12" in message
    assert "conda_envs/build_in_image.sh 25.09-py3" in message and "make env" in message
    assert env_asset(env_tarball("3.10"), "24.09-py3").python == "3.10"  # old tags: 3.10


def test_env_without_activate_or_python_is_refused(env_tarball, tmp_path):
    with pytest.raises(AssetError, match="no bin/activate"):
        env_asset(env_tarball("3.12", activate=False), "25.09-py3")
    with pytest.raises(AssetError, match="no Python found"):
        env_asset(env_tarball("3.12", layout="none"), "25.09-py3")
    with pytest.raises(AssetError, match="does not exist"):
        env_asset(tmp_path / "missing.tar.gz", "25.09-py3")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(AssetError, match="not a readable tar archive"):
        env_asset(tmp_path / "junk.tar.gz", "25.09-py3")


def test_base_tarball_is_reproducible_and_named_by_its_sha256(fake_base):
    first, second = base_asset(str(fake_base)), base_asset(str(fake_base))
    assert first == second and first.name == f"base-{first.sha256}.tar.gz"
    import tarfile

    with tarfile.open(first.path) as tar:
        assert (
            "base/model_index.json" in tar.getnames()
        )  # one diffusers folder, as ensure_base wants


# ---------------------------------------------------------------- IAM policies


def _resources(statement) -> list[str]:
    value = statement["Resource"]
    return [value] if isinstance(value, str) else value


SUBNETS = "subnet-0123456789abcdef0,subnet-0123456789abcdef1"
GROUPS = "sg-0123456789abcdef0"
KEY_ARN = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.mark.parametrize("secured", [False, True])
@pytest.mark.parametrize("account", ["*", ACCOUNT])
@pytest.mark.parametrize("which", ["mme", "training"])
def test_policies_are_least_privilege_in_shape(which, account, secured, deploy_config):
    if secured:
        deploy_config = dataclasses.replace(
            deploy_config, kms_key="create", vpc_subnets=SUBNETS, vpc_security_groups=GROUPS
        )
    policy = (mme_policy if which == "mme" else training_policy)(deploy_config, account)
    assert policy["Version"] == "2012-10-17"
    endpoint = f"avatarforge-{which}"
    ours = (
        "${kms_key:alias/avatarforge/avatarforge}",  # the key deploy makes: its ARN once made
        *(
            f"arn:aws:ec2:us-east-1:{account}:{t}"
            for t in ("network-interface/*", "subnet/subnet-0", "security-group/sg-0")
        ),
        f"arn:aws:s3:::{TEST_BUCKET}/avatarforge/",  # objects only under our prefix
        f"arn:aws:s3:::{TEST_BUCKET}",  # ListBucket, limited by an s3:prefix condition below
        f"arn:aws:sns:us-east-1:{account}:avatarforge-training-",
        f"arn:aws:logs:us-east-1:{account}:log-group:/aws/sagemaker/Endpoints/{endpoint}",
        "arn:aws:ecr:us-east-1:763104351884:repository/sagemaker-tritonserver",
        f"arn:aws:ecr:us-east-1:{ACCOUNT}:repository/avatarforge-training",
    )
    for statement in policy["Statement"]:
        assert {"Effect", "Action", "Resource"} <= set(statement), statement
        assert statement["Effect"] == "Allow"
        for action in statement["Action"]:
            assert "*" not in action, action  # no wildcard actions
        for resource in _resources(statement):
            if resource == "*":
                assert set(statement["Action"]) <= UNSCOPED_ACTIONS, statement
            else:
                assert resource.startswith(ours), resource
        if statement["Action"] == ["s3:ListBucket"]:
            prefixes = statement["Condition"]["StringLike"]["s3:prefix"]
            assert all(p.startswith("avatarforge/") for p in prefixes)
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    if which == "mme":
        assert "s3:PutObject" not in actions  # serving only reads
        assert "kms:GenerateDataKey" not in actions  # nor encrypts
    else:
        assert {"s3:PutObject", "sns:Publish"} <= actions
    assert ("kms:Decrypt" in actions) == secured
    assert ("ec2:CreateNetworkInterface" in actions) == secured
    trust = trust_policy()["Statement"][0]
    assert trust["Principal"] == {"Service": "sagemaker.amazonaws.com"}


# ---------------------------------------------------------------- the plan


def _assets(deploy_config) -> MMEAssets:
    return MMEAssets(
        base_asset(deploy_config.base), env_asset(deploy_config.env_tarball, "25.09-py3")
    )


def test_names_do_not_depend_on_the_account_so_a_dry_run_shows_the_real_names(deploy_config):
    assets = _assets(deploy_config)
    dry = plan_mme(deploy_config, assets)
    real = plan_mme(deploy_config, assets, account=ACCOUNT)
    assert [r.name for r in dry.resources] == [r.name for r in real.resources]
    made = plan_mme(dataclasses.replace(deploy_config, role_arn=""), assets, create_role=True)
    made_real = plan_mme(
        dataclasses.replace(deploy_config, role_arn=""), assets, create_role=True, account=ACCOUNT
    )
    assert [r.name for r in made.resources] == [r.name for r in made_real.resources]
    changed = plan_mme(dataclasses.replace(deploy_config, mme_instance_type="ml.g5.xlarge"), assets)
    kinds = {r.kind: r.name for r in changed.resources}
    before = {r.kind: r.name for r in dry.resources}
    assert kinds["sagemaker_model"] == before["sagemaker_model"]  # same model...
    assert kinds["endpoint_config"] != before["endpoint_config"]  # ...in a new endpoint config


def test_training_environment_is_what_the_training_service_reads(deploy_config):
    jobs = pytest.importorskip("avatarforge.jobs")
    env = training_environment(deploy_config, "s3://b/avatarforge/shared/base-x.tar.gz")
    ours = {k for k in env if k.startswith(jobs.config.ENV_PREFIX)}
    fields = {jobs.ServiceConfig.env_name(f.name) for f in dataclasses.fields(jobs.ServiceConfig)}
    assert ours <= fields  # from_env ignores unknown names: a typo would be silent
    service = jobs.ServiceConfig.from_env(env)
    assert service.base_source == "s3://b/avatarforge/shared/base-x.tar.gz"
    assert service.max_concurrent_jobs == deploy_config.training_concurrency
    assert service.deadline_s == deploy_config.training_timeout_s - 300
    assert service.shared_dir == deploy_config.shared_dir
    # the service refuses every job without it, and reads photos only under the deployment's
    assert service.s3_prefix == deploy_config.s3("")
    assert service.photos_prefix == deploy_config.photos_prefix
    assert service.models_prefix == deploy_config.models_prefix


def test_a_plan_without_a_role_or_image_says_what_to_do(deploy_config):
    base = base_asset(deploy_config.base)
    plan = plan_training(
        dataclasses.replace(deploy_config, role_arn="", training_image_uri=""), base
    )
    text = " ".join(plan.blockers)
    assert "training_image_uri is empty" in text and "make training-image" in text
    assert "--create-role" in text and "facts.policies.training" in text
    created = plan_training(deploy_config, base, create_role=True)
    assert created.blockers == []  # role_arn set: nothing to create
    assert "iam_role" not in {r.kind for r in created.resources}


def test_a_failed_endpoint_or_a_foreign_one_blocks_the_plan(deploy_config):
    assets = _assets(deploy_config)
    tag = {"avatarforge:deployment": "avatarforge"}
    failed = {"EndpointName": "avatarforge-mme", "EndpointConfigName": "x", "_Status": "Failed"}
    plan = plan_mme(deploy_config, assets, {("endpoint", "avatarforge-mme"): Existing(failed, tag)})
    (blocker,) = plan.blockers
    assert "Failed" in blocker and "deploy destroy" in blocker
    ok = dict(failed, _Status="InService")
    foreign = plan_mme(deploy_config, assets, {("endpoint", "avatarforge-mme"): Existing(ok, {})})
    assert "not tagged avatarforge:deployment=avatarforge" in foreign.blockers[0]


def _by_kind(plan, kind: str) -> list:
    return [r for r in plan.resources if r.kind == kind]


def test_mme_scaling_target_comes_from_measured_throughput_with_its_source(deploy_config):
    assets = _assets(deploy_config)
    plan = plan_mme(deploy_config, assets)
    (policy,) = _by_kind(plan, "scaling_policy")
    tracking = policy.attrs["TargetTrackingScalingPolicyConfiguration"]
    # an A10G: 4 x the H200's 0.7465 s an image = 2.986 s, 20.1 images a minute; 75% of it
    assert tracking["TargetValue"] == 15.0
    scaling = plan.facts["scaling"]
    assert scaling["from"] == "75% of 20.1 images/min"
    throughput = scaling["throughput"]
    assert throughput["estimate"] and throughput["gpu"] == "NVIDIA A10G"
    assert throughput["source"].startswith("bench/results/gpu-h200-2026-11-26.json")
    cost = plan.facts["cost"]["per_images"]  # $1.515/h / (20.1 images/min x 60)
    assert cost == {"usd_per_1000_images": 1.26, "usd_per_1000_images_at_target": 1.68}
    job = plan_training(deploy_config, assets.base).facts["cost"]["per_job"]
    assert (job["minutes_per_job"], job["usd_per_job"]) == (20.9, 0.53)  # 4 x 5.22 min
    assert job["estimate"] and "ESTIMATE" in job["basis"]

    given = plan_mme(dataclasses.replace(deploy_config, mme_invocations_per_instance=40), assets)
    assert given.facts["scaling"]["from"] == "deploy.mme_invocations_per_instance"
    (policy,) = _by_kind(given, "scaling_policy")
    assert policy.attrs["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 40.0
    # a GPU with no figure: no number is made up
    t4 = plan_mme(dataclasses.replace(deploy_config, mme_instance_type="ml.g4dn.xlarge"), assets)
    (blocker,) = t4.blockers
    assert "no measured throughput for ml.g4dn.xlarge" in blocker
    assert "mme_invocations_per_instance" in blocker


def test_throughput_figures_are_the_bench_results_they_cite(repo_root):
    from avatarforge.deploy import throughput

    source = json.loads((repo_root / throughput.SOURCE).read_text())["results"]
    assert source["environment"]["gpu"] == throughput.MEASURED_GPU
    generation = source["measurements"]["generation"]
    assert generation["workload"] == "512x512, 30 DDIM steps, guidance 7.5, batch 1"
    figure = generation["figures"][throughput.GENERATION_FIGURE.split(": ", 1)[1]]
    assert figure == {"value": throughput.SECONDS_PER_IMAGE, "unit": "s/image"}
    training = source["measurements"]["training"]["figures"]
    job = training[throughput.TRAINING_FIGURE.split(": ", 1)[1]]
    assert (job["value"], job["unit"]) == (throughput.TRAINING_JOB_MINUTES, "min")
    bench = (repo_root / "bench" / "gpu.py").read_text()
    assert f"A10G_FACTOR = {throughput.A10G_FACTOR} " in bench  # one estimate, everywhere
    gen_args = pytest.importorskip("avatarforge.generate").GenArgs()
    assert (gen_args.steps, gen_args.width, gen_args.height, gen_args.num_images) == (
        30,
        512,
        512,
        1,
    )  # fmt: skip  (the workload measured is the serving defaults)


def test_retention_lifecycle_and_log_retention_are_in_both_plans(deploy_config):
    assets = _assets(deploy_config)
    for plan in (plan_mme(deploy_config, assets), plan_training(deploy_config, assets.base)):
        (lifecycle,) = _by_kind(plan, "s3_lifecycle")
        rules = lifecycle.attrs["Rules"]
        assert [r["Filter"]["Prefix"] for r in rules] == [
            "avatarforge/photos/",
            "avatarforge/jobs/",
            "avatarforge/async/out/",
            "avatarforge/async/failed/",
        ]  # fmt: skip  (models/ and shared/ stay)
        assert {r["Expiration"]["Days"] for r in rules} == {7}
        assert {r["NoncurrentVersionExpiration"]["NoncurrentDays"] for r in rules} == {1}
        (group,) = _by_kind(plan, "log_group")
        assert group.attrs["retentionInDays"] == 30
        endpoint = plan.facts["endpoint"]
        assert group.name == f"/aws/sagemaker/Endpoints/{endpoint}"
        kinds = [r.kind for r in plan.resources]
        assert kinds.index("log_group") < kinds.index("endpoint")  # made before SageMaker does
    off = plan_training(
        dataclasses.replace(deploy_config, retention_days=0, log_retention_days=0), assets.base
    )
    assert _by_kind(off, "s3_lifecycle")[0].attrs["Rules"] == []
    assert _by_kind(off, "log_group")[0].attrs["retentionInDays"] is None


def test_alarms_of_both_endpoints_notify_the_alarm_topic_and_its_subscribers(deploy_config):
    cfg = dataclasses.replace(
        deploy_config,
        alarm_subscriptions=f"ops@example.com, https://hooks.example.com/a,"
        f"arn:aws:sqs:us-east-1:{ACCOUNT}:alarms",
    )
    assets = _assets(cfg)
    mme, training = plan_mme(cfg, assets), plan_training(cfg, assets.base)
    metrics = {
        plan.command: {
            r.attrs["MetricName"]: r.attrs
            for r in _by_kind(plan, "cloudwatch_alarm")
            if r.attrs.get("AlarmActions") == ["${sns_topic:avatarforge-alarms}"]
        }
        for plan in (mme, training)
    }
    assert sorted(metrics["mme"]) == [
        "GPUMemoryUtilization", "Invocation5XXErrors", "MemoryUtilization", "ModelLatency",
        "ModelLoadingWaitTime",
    ]  # fmt: skip
    assert sorted(metrics["training"]) == ["ApproximateAgeOfOldestRequest", "InvocationFailures"]
    assert metrics["mme"]["ModelLatency"]["ExtendedStatistic"] == "p90"
    assert metrics["mme"]["ModelLatency"]["Threshold"] == 45e6  # microseconds: 3/4 of 60 s
    assert metrics["mme"]["MemoryUtilization"]["Namespace"] == "/aws/sagemaker/Endpoints"
    assert metrics["training"]["ApproximateAgeOfOldestRequest"]["Threshold"] == 3600  # TTL / 2
    for plan in (mme, training):
        subs = [
            (r.attrs["Protocol"], r.attrs["Endpoint"]) for r in _by_kind(plan, "sns_subscription")
        ]
        assert subs == [
            ("email", "ops@example.com"), ("https", "https://hooks.example.com/a"),
            ("sqs", f"arn:aws:sqs:us-east-1:{ACCOUNT}:alarms"),
        ]  # fmt: skip
        assert "avatarforge-alarms" in [r.name for r in _by_kind(plan, "sns_topic")]


def test_kms_key_and_vpc_reach_every_resource_they_protect(deploy_config):
    cfg = dataclasses.replace(
        deploy_config, kms_key="create", vpc_subnets=SUBNETS, vpc_security_groups=GROUPS
    )
    assets = _assets(cfg)
    key = "${kms_key:alias/avatarforge/avatarforge}"
    mme, training = plan_mme(cfg, assets), plan_training(cfg, assets.base)
    for plan in (mme, training):
        (made,) = _by_kind(plan, "kms_key")
        assert made.name == "alias/avatarforge/avatarforge"
        cloudwatch = made.attrs["Policy"]["Statement"][1]
        assert cloudwatch["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
        (encryption,) = _by_kind(plan, "s3_bucket_encryption")
        default = encryption.attrs["Rules"][0]["ApplyServerSideEncryptionByDefault"]
        assert default == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key}
        (endpoint_config,) = _by_kind(plan, "endpoint_config")
        assert endpoint_config.attrs["KmsKeyId"] == key
        (model,) = _by_kind(plan, "sagemaker_model")
        assert model.attrs["VpcConfig"] == {
            "SecurityGroupIds": ["sg-0123456789abcdef0"],
            "Subnets": ["subnet-0123456789abcdef0", "subnet-0123456789abcdef1"],
        }
        assert "EnableNetworkIsolation" not in model.attrs
        assert {r.attrs["KmsMasterKeyId"] for r in _by_kind(plan, "sns_topic")} == {key}
        security = plan.facts["security"]
        assert security["network_isolation"] is False
        assert security["vpc"]["subnets"] == cfg.subnets
    (endpoint_config,) = _by_kind(training, "endpoint_config")
    assert endpoint_config.attrs["AsyncInferenceConfig"]["OutputConfig"]["KmsKeyId"] == key
    assert "serving env" in mme.facts["security"]["network_isolation_why"]
    assert "photos" in training.facts["security"]["network_isolation_why"]
    assert "local NVMe" in mme.facts["security"]["volumes"]  # ml.g5: KmsKeyId does not cover it

    given = dataclasses.replace(deploy_config, kms_key=KEY_ARN)
    plan = plan_mme(given, assets)
    assert _by_kind(plan, "kms_key") == []  # used, never made or changed
    assert _by_kind(plan, "endpoint_config")[0].attrs["KmsKeyId"] == KEY_ARN
    assert "cloudwatch.amazonaws.com" in " ".join(plan.notes)  # what its policy must allow
    # neither set: no new field in a model or endpoint config, so their names stay as before
    plain = plan_mme(deploy_config, assets)
    assert "VpcConfig" not in _by_kind(plain, "sagemaker_model")[0].attrs
    assert "KmsKeyId" not in _by_kind(plain, "endpoint_config")[0].attrs
    assert _by_kind(plain, "kms_key") == _by_kind(plain, "s3_bucket_encryption") == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"vpc_subnets": "subnet-0123456789abcdef0", "vpc_security_groups": GROUPS},
         "at least two"),
        ({"vpc_subnets": SUBNETS}, "set both or neither"),
        ({"vpc_subnets": "subnet-1,subnet-2", "vpc_security_groups": GROUPS}, "not such an id"),
        ({"kms_key": "alias/mine"}, "an alias cannot scope IAM policies"),
        ({"kms_key": KEY_ARN.replace("us-east-1", "eu-west-1")}, "the key is in eu-west-1"),
        ({"alarm_subscriptions": "http://hooks.example.com"}, "use https://"),
        ({"alarm_subscriptions": "ops"}, "no email address"),
        ({"log_retention_days": 10}, "CloudWatch's values"),
    ],
)  # fmt: skip
def test_security_and_operations_settings_are_checked_where_they_enter(fields, message):
    with pytest.raises(ConfigError, match=message):
        DeployConfig(**fields)


# ---------------------------------------------------------------- the dry run, no AWS at all


@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    """No AWS_* variable, no ~/.aws, and no network: any connection attempt fails the test."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))

    def refuse(*args, **kwargs):
        raise AssertionError(f"the dry run tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_dry_run_prints_a_complete_plan_with_no_aws_account(no_aws, deploy_config, tmp_path):
    config_file = tmp_path / "deploy.json"
    config_file.write_text(json.dumps(deploy_config.to_dict()))
    result = runner.invoke(
        app, ["deploy", "mme", "--config", str(config_file), "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["account"] == "" and plan["blockers"] == []
    kinds = [r["kind"] for r in plan["resources"]]
    assert kinds == [
        "s3_bucket", "s3_lifecycle", "s3_object", "s3_object", "log_group", "sagemaker_model",
        "endpoint_config", "endpoint", "scalable_target", "scaling_policy", "sns_topic",
        *["cloudwatch_alarm"] * 5,
    ]  # fmt: skip
    assert {r["action"] for r in plan["resources"]} == {"create"}
    image = plan["facts"]["image"]
    assert (image["triton_tag"], image["stub_python"]) == ("25.09-py3", "3.12")
    assert plan["facts"]["triton"] == {"ping_mode": "live", "log_verbose": "0"}
    assert plan["facts"]["cost"]["usd_per_instance_hour"] > 1
    assert plan["facts"]["policies"]["mme"]["permissions"]["Statement"]

    result = runner.invoke(
        app,
        ["deploy", "training", "--config", str(config_file), "--dry-run", "--bucket", "other-bkt",
         "--training-max-instances", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for expected in (
        "sns_topic", "HasBacklogWithoutCapacity", "ApproximateBacklogSizePerInstance",
        "0..3 instances", "async", "ml.g5.2xlarge", "$1.515/h", "djl-inference",
        "timeout 3600 s", "other-bkt", "expire after 7200 s in the queue",
        "InferenceAmiVersion al2023-ami-sagemaker-inference-gpu-4-1",
    ):  # fmt: skip
        assert expected in text, expected
    result = runner.invoke(app, ["deploy", "mme", "--config", str(config_file), "--dry-run"])
    text = " ".join(result.output.split())
    assert "tritonserver: /ping mode live" in text and "--log-verbose=0" in text
    assert "InferenceAmiVersion al2023-ami-sagemaker-inference-gpu-4-1" in text


def test_dry_run_with_nothing_configured_lists_what_is_missing_and_fails(no_aws, fake_base):
    result = runner.invoke(app, ["deploy", "mme", "--dry-run", "--base", str(fake_base)])
    assert result.exit_code == 1, result.output  # issue 23: CI can gate on a dry run
    text = " ".join(result.output.split())
    assert "deploy.bucket is empty" in text and "serving env tarball" in text
    assert "no IAM role" in text and '"s3:GetObject"' in text  # the policy is printed
    assert "error: deploy mme --dry-run: 3 blocker(s) stand" in text
    result = runner.invoke(app, ["deploy", "training", "--dry-run", "--json", "--base",
                                 str(fake_base), "--bucket", TEST_BUCKET])  # fmt: skip
    assert result.exit_code == 1
    assert json.loads(result.stdout)["blockers"]  # the plan is still printed whole


def test_config_file_values_are_overridden_only_by_options_given(no_aws, deploy_config, tmp_path):
    config_file = tmp_path / "deploy.json"
    config_file.write_text(json.dumps({**deploy_config.to_dict(), "mme_max_instances": 7}))
    result = runner.invoke(
        app, ["deploy", "mme", "--config", str(config_file), "--dry-run", "--json",
              "--mme-instance-type", "ml.g5.xlarge"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    resources = {r["kind"]: r["attrs"] for r in json.loads(result.stdout)["resources"]}
    assert resources["scalable_target"]["MaxCapacity"] == 7  # from the file
    variant = resources["endpoint_config"]["ProductionVariants"][0]
    assert variant["InstanceType"] == "ml.g5.xlarge"  # from the option
    config_file.write_text(json.dumps({"bucket": "Bad_Bucket"}))
    result = runner.invoke(app, ["deploy", "mme", "--config", str(config_file), "--dry-run"])
    assert result.exit_code == 1 and "deploy.bucket" in result.output


def test_real_run_without_credentials_is_a_clear_error(no_aws, monkeypatch):
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # boto3's last resort, a network call
    result = runner.invoke(app, ["deploy", "destroy", "--bucket", TEST_BUCKET])
    assert result.exit_code == 1
    assert "no AWS credentials found" in result.output and "Traceback" not in result.output


def test_the_optional_api_has_its_place_in_the_deploy_commands(no_aws, tmp_path):
    result = runner.invoke(app, ["deploy", "api", "--dry-run", "--json", "--bucket", TEST_BUCKET])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    statements = plan["facts"]["policies"]["api"]["permissions"]["Statement"]
    actions = {a for statement in statements for a in statement["Action"]}
    assert "sagemaker:InvokeEndpointAsync" in actions and "s3:*" not in actions
    assert not any(a.startswith("iam:") for a in actions)  # it calls, it never grants


@pytest.mark.parametrize("command", ["mme", "training", "api", "destroy"])
def test_deploy_commands_explain_themselves(command):
    result = runner.invoke(app, ["deploy", command, "--help"])
    assert result.exit_code == 0 and "--dry-run" in result.output and "--config" in result.output


def test_deploy_images_prints_the_sdks_uris_or_why_not(no_aws):
    result = runner.invoke(app, ["deploy", "images", "--region", "il-central-1"])
    assert result.exit_code == 0, result.output
    registry = "780543022126.dkr.ecr.il-central-1.amazonaws.com"
    assert result.stdout.splitlines() == [
        f"triton {registry}/sagemaker-tritonserver:25.09-py3",
        f"lmi {registry}/djl-inference:0.36.0-lmi27.0.0-cu130",
    ]
    result = runner.invoke(app, ["deploy", "images", "--lmi-image-tag", "0.37.0-lmi1-cu130"])
    assert result.exit_code == 1 and "Unsupported djl-lmi version: 0.37.0" in result.output


def test_a_safety_checker_is_uploaded_and_named_in_the_mmes_environment(
    deploy_config, tmp_path, monkeypatch
):
    from avatarforge.deploy.assets import AssetError, safety_asset
    from avatarforge.safe_tar import safe_extract
    from avatarforge.serving.safety import checker_folders
    from avatarforge.testing.safety import build_tiny_safety_checker

    monkeypatch.setenv("AVATARFORGE_BUILD", str(tmp_path / "build"))
    folder = build_tiny_safety_checker(tmp_path / "checker", flag_everything=False)
    assets = dataclasses.replace(_assets(deploy_config), safety=safety_asset(str(folder)))
    plan = plan_mme(deploy_config, assets)
    (obj,) = [r for r in plan.resources if r.name.endswith(assets.safety.name)]
    assert obj.attrs["sha256"] == assets.safety.sha256
    (model,) = [r for r in plan.resources if r.kind == "sagemaker_model"]
    env = model.attrs["PrimaryContainer"]["Environment"]
    assert env["AVATARFORGE_SERVING_SAFETY_CHECKER"] == f"s3://{obj.attrs['Bucket']}/{obj.name}"
    # what the instance extracts is a checker folder again
    safe_extract(assets.safety.path, tmp_path / "x")
    checker_folders(tmp_path / "x" / "safety-checker")
    # without one, nothing is uploaded and the variable is not set
    plain = plan_mme(deploy_config, _assets(deploy_config))
    (model,) = [r for r in plain.resources if r.kind == "sagemaker_model"]
    assert (
        "AVATARFORGE_SERVING_SAFETY_CHECKER" not in model.attrs["PrimaryContainer"]["Environment"]
    )
    with pytest.raises(AssetError, match="deploy.safety_checker: serving.safety_checker: "):
        safety_asset(str(tmp_path))


def test_the_mmes_serving_settings_come_from_the_config_file_checked_as_the_base_reads_them(
    deploy_config, no_aws, tmp_path
):
    from avatarforge.serving.config import ServingConfig

    config = dataclasses.replace(deploy_config, mme_serving={"request_timeout_s": 120,
                                                             "batching": False})  # fmt: skip
    (model,) = [r for r in plan_mme(config, _assets(config)).resources
                if r.kind == "sagemaker_model"]  # fmt: skip
    env = model.attrs["PrimaryContainer"]["Environment"]
    # what the shared base on the instance reads back
    served = ServingConfig.from_env(env)
    assert (served.request_timeout_s, served.batching) == (120, False)
    assert served.max_request_cost == ServingConfig().max_request_cost  # the rest: defaults
    for bad, named in (
        ({"max_batch_size": 2}, "max_batch_size not set here"),
        ({"safety_checker": "/x"}, "safety_checker not set here"),
        ({"request_timeout_s": 0}, "serving.request_timeout_s: must be >= 1"),
        ({"nope": 1}, "serving: unknown field(s) nope"),
    ):
        with pytest.raises(ConfigError, match=re.escape(f"deploy.mme_serving: {named}")):
            dataclasses.replace(deploy_config, mme_serving=bad)
    # from a deploy.json, through the command (not an option: a JSON object)
    path = tmp_path / "deploy.json"
    path.write_text(
        json.dumps({**deploy_config.to_dict(), "mme_serving": {"request_timeout_s": 0}})
    )
    result = CliRunner().invoke(app, ["deploy", "mme", "--config", str(path), "--dry-run"])
    assert result.exit_code == 1 and "deploy.mme_serving" in result.output, result.output
