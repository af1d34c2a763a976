"""Deploy without AWS: image table, env tarball check, IAM policy shape, the plan, the dry run."""

from __future__ import annotations

import dataclasses
import json
import os
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


@pytest.mark.parametrize("account", ["*", ACCOUNT])
@pytest.mark.parametrize("which", ["mme", "training"])
def test_policies_are_least_privilege_in_shape(which, account, deploy_config):
    policy = (mme_policy if which == "mme" else training_policy)(deploy_config, account)
    assert policy["Version"] == "2012-10-17"
    endpoint = f"avatarforge-{which}"
    ours = (
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
    else:
        assert {"s3:PutObject", "sns:Publish"} <= actions
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
        "s3_bucket", "s3_object", "s3_object", "sagemaker_model", "endpoint_config", "endpoint",
        "scalable_target", "scaling_policy",
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


def test_dry_run_with_nothing_configured_lists_what_is_missing(no_aws, fake_base):
    result = runner.invoke(app, ["deploy", "mme", "--dry-run", "--base", str(fake_base)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "deploy.bucket is empty" in text and "serving env tarball" in text
    assert "no IAM role" in text and '"s3:GetObject"' in text  # the policy is printed


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


@pytest.mark.parametrize("command", ["mme", "training", "destroy"])
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
