"""The deployment description: one typed config from which every AWS name and path is derived.

Deploy (``avatarforge deploy ...``), the cloud client (``avatarforge submit|status|generate
--endpoint``) and the local cloud demo all read this one description, so a bucket prefix or an
endpoint name is written in one place. It is a JSON file (``--config deploy.json``); every
field has a default, so ``avatarforge deploy mme --dry-run --bucket my-bucket`` plans without
one.

S3 layout under ``s3://<bucket>/<prefix>``::

    photos/<user>/<job_id>/...   uploads of the client (the training job's input)
    models/<user>.tar.gz         the MME prefix: one TargetModel per user (ModelDataUrl)
    shared/                      base weights tarball + serving env tarball (sha256 in metadata)
    jobs/<job_id>/               training job requests, checkpoints and results
    async/out/  async/failed/    the async endpoint's S3OutputPath and S3FailurePath
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..settings import ConfigError, Settings, setting
from .images import parse_ecr_uri, triton_version

_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,40}$")  # SageMaker names, with room for suffixes
MIN_TRAINING_TIMEOUT_S = 180
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
KMS_CREATE = "create"
_KMS_KEY_ARN = re.compile(
    r"^arn:aws:kms:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):key/(?P<id>(mrk-)?[0-9a-f-]{32,36})$"
)
_SUBNET = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_SECURITY_GROUP = re.compile(r"^sg-[0-9a-f]{8,17}$")
_EMAIL = re.compile(r"^[^@\s,]+@[^@\s,]+\.[^@\s,]+$")
_SQS_ARN = re.compile(r"^arn:aws:sqs:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,80}(\.fifo)?$")
# CloudWatch Logs' retention values (botocore's logs model, shape Days)
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827,
                      2192, 2557, 2922, 3288, 3653)  # fmt: skip


def _items(value: str | list | tuple) -> list[str]:
    """A comma-separated setting (a JSON list is taken too) as its non-empty items."""
    parts = value if isinstance(value, list | tuple) else str(value).split(",")
    return [p.strip() for p in parts if str(p).strip()]


def _subscription(item: str) -> tuple[str, str]:
    if item.startswith("https://") and len(item) > len("https://"):
        return "https", item
    if _SQS_ARN.match(item):
        return "sqs", item
    if _EMAIL.match(item):
        return "email", item
    why = " (plain HTTP sends alarms unencrypted: use https://)" if item.startswith("http:") else ""
    raise ConfigError(
        f"deploy.alarm_subscriptions: {item!r} is no email address, https:// URL or SQS queue "
        f"ARN{why}"
    )


@dataclass
class DeployConfig(Settings):
    section = "deploy"

    name: str = setting(
        "avatarforge", "deployment name: prefix of every resource name and the value of its tag"
    )
    region: str = setting("us-east-1", "AWS region")
    bucket: str = setting("", "S3 bucket of the deployment (must exist or be creatable)")
    prefix: str = setting("avatarforge/", "key prefix of everything in the bucket")
    role_arn: str = setting(
        "", "IAM role SageMaker assumes (empty: deploy prints the policy it needs and stops)"
    )
    mme_instance_type: str = setting("ml.g5.2xlarge", "GPU instance type of the MME endpoint")
    mme_min_instances: int = setting(1, "MME autoscaling minimum (>= 1: it serves real time)", ge=1)
    mme_max_instances: int = setting(4, "MME autoscaling maximum", ge=1, le=100)
    mme_invocations_per_instance: int = setting(
        0,
        "target of SageMakerVariantInvocationsPerInstance (per minute) for MME scaling; 0: "
        "derived from the measured images per minute of the instance's GPU (the plan shows it)",
        ge=0,
    )
    triton_image_tag: str = setting(
        "25.09-py3", "tag of the SageMaker Triton image (its stub's Python decides the env's)"
    )
    inference_ami_version: str = setting(
        "al2023-ami-sagemaker-inference-gpu-4-1",
        "InferenceAmiVersion of both endpoints (NVIDIA driver 580, CUDA 13.0: the CUDA 13 LMI "
        "image and serving torch need it); '' leaves SageMaker's default AMI",
    )
    training_instance_type: str = setting(
        "ml.g5.2xlarge", "GPU instance type of the async training endpoint"
    )
    training_max_instances: int = setting(2, "training endpoint autoscaling maximum", ge=1, le=20)
    training_concurrency: int = setting(
        2, "MaxConcurrentInvocationsPerInstance of the async endpoint (jobs per instance)", ge=1
    )
    training_timeout_s: int = setting(
        3600, "InvocationTimeoutSeconds of a training job (async maximum: 3600)", ge=60, le=3600
    )
    training_request_ttl_s: int = setting(
        7200,
        "RequestTTLSeconds of a training job: how long it may wait in the async queue before "
        "it expires (SageMaker's default: 6 h)",
        ge=60,
        le=21600,
    )
    lmi_image_tag: str = setting(
        "0.36.0-lmi27.0.0-cu130", "tag of the LMI (djl-inference) image the training image is FROM"
    )
    training_image_uri: str = setting(
        "", "our training image in ECR (make training-image); empty: not deployable yet"
    )
    shared_dir: str = setting(
        "/tmp/avatarforge", "where an MME instance keeps the shared base and serving env"
    )
    base: str = setting(
        "tiny", "the base that trains and serves: 'tiny' or a local diffusers folder (uploaded)"
    )
    env_tarball: str = setting(
        "",
        "serving env tarball for the Triton image's Python (conda_envs/build_in_image.sh); "
        "empty: build/envs/serve.tar.gz",
    )
    mme_serving: dict = setting(  # noqa: RUF009
        {},
        "the MME instances' serving settings: serving fields as a JSON object (e.g. "
        '{"request_timeout_s": 120}), set as AVATARFORGE_SERVING_<FIELD> in the MME\'s '
        "environment; empty: the instance's defaults, by device (max_batch_size is a "
        "package's, safety_checker deploy.safety_checker's)",
    )
    safety_checker: str = setting(
        "",
        "a local StableDiffusionSafetyChecker folder (serving.safety_checker): uploaded under "
        "shared/ and checked against every image the MME answers; empty: no check",
    )
    training_role_arn: str = setting(
        "", "IAM role of the training endpoint (empty: role_arn; least privilege: its own role)"
    )
    retention_days: int = setting(
        7,
        "photos, job records and work files, async outputs and failures (photos/, jobs/, "
        "async/) expire this many days after they are written, by S3 lifecycle rules; user "
        "models stay until forgotten; 0: no expiry",
        ge=0,
        le=3650,
    )
    log_retention_days: int = setting(
        30,
        "retention of the endpoints' CloudWatch log groups (they hold user and job ids): one of "
        "CloudWatch's values (1, 3, 5, 7, 14, 30, 60, 90, ... 3653); 0: never expire",
        ge=0,
        le=3653,
    )
    kms_key: str = setting(
        "",
        "KMS key for S3 objects, endpoint volumes and SNS topics: '' none (S3's own "
        "encryption), 'create' (deploy makes one; destroy --delete-data schedules its deletion) "
        "or an existing key's ARN in the deployment's region (used, never changed)",
    )
    vpc_subnets: str = setting(
        "",
        "comma-separated subnet ids (at least two, in different availability zones) both "
        "endpoints run in; '' runs them outside your VPC",
    )
    vpc_security_groups: str = setting(
        "", "comma-separated security group ids of both endpoints (with vpc_subnets)"
    )
    alarm_subscriptions: str = setting(
        "",
        "comma-separated endpoints subscribed to the alarms' SNS topic: email addresses, "
        "https:// URLs, SQS queue ARNs",
    )

    def mme_serving_env(self) -> dict[str, str]:
        """``mme_serving`` as the MME's ``AVATARFORGE_SERVING_<FIELD>`` variables, checked as the
        shared base will read them (a ConfigError naming the field)."""
        from ..serving.config import PACKAGED, ServingConfig

        values = self.mme_serving
        if not isinstance(values, dict):
            raise ConfigError(f"deploy.mme_serving: must be a JSON object (got {values!r})")
        if taken := sorted(set(values) & {*PACKAGED, "safety_checker"}):
            raise ConfigError(
                f"deploy.mme_serving: {', '.join(taken)} not set here (max_batch_size is each "
                "package's: package --max-batch-size; a checker is deploy.safety_checker)"
            )
        try:
            env = ServingConfig.from_dict(values).to_env()
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"deploy.mme_serving: {exc}") from None
        return {name: env[name] for name in map(ServingConfig.env_name, values)}

    def validate(self) -> None:
        self.mme_serving_env()
        if self.region.startswith("cn-"):
            raise ConfigError(
                f"deploy.region: {self.region!r} is in the China partition (arn:aws-cn), which "
                "deploy's IAM policies and ARNs do not cover"
            )
        if not _NAME.match(self.name):
            raise ConfigError(
                f"deploy.name: letters, digits and '-', 1-41 chars (got {self.name!r})"
            )
        if self.bucket and not _BUCKET.match(self.bucket):
            raise ConfigError(f"deploy.bucket: not a valid S3 bucket name (got {self.bucket!r})")
        if self.prefix and (self.prefix.startswith("/") or not self.prefix.endswith("/")):
            raise ConfigError(f"deploy.prefix: relative and ending in '/' (got {self.prefix!r})")
        if self.mme_min_instances > self.mme_max_instances:
            raise ConfigError("deploy.mme_min_instances: must be <= mme_max_instances")
        if self.training_timeout_s < MIN_TRAINING_TIMEOUT_S:
            # the service keeps finish_reserve_s (120 s by default) of its deadline to save and
            # upload; a shorter deadline makes the training container refuse to start
            raise ConfigError(
                f"deploy.training_timeout_s: must be >= {MIN_TRAINING_TIMEOUT_S} "
                f"(got {self.training_timeout_s})"
            )
        triton_version(self.triton_image_tag)
        if self.training_image_uri:
            parse_ecr_uri(self.training_image_uri)
        if self.log_retention_days and self.log_retention_days not in LOG_RETENTION_DAYS:
            raise ConfigError(
                f"deploy.log_retention_days: one of 0, {', '.join(map(str, LOG_RETENTION_DAYS))} "
                f"(CloudWatch's values; got {self.log_retention_days})"
            )
        self._validate_kms_key()
        self._validate_vpc()
        self.subscriptions  # noqa: B018 (each one parses, or the error names it)

    def _validate_kms_key(self) -> None:
        if self.kms_key in ("", KMS_CREATE):
            return
        match = _KMS_KEY_ARN.match(self.kms_key)
        if not match:
            raise ConfigError(
                f"deploy.kms_key: '', 'create' or a key ARN (arn:aws:kms:<region>:<account>:"
                f"key/<id>; an alias cannot scope IAM policies) (got {self.kms_key!r})"
            )
        if match["region"] != self.region:
            raise ConfigError(
                f"deploy.kms_key: the key is in {match['region']}, the deployment in "
                f"{self.region} (S3, SageMaker and SNS use keys of their own region)"
            )

    def _validate_vpc(self) -> None:
        subnets, groups = self.subnets, self.security_groups
        if bool(subnets) != bool(groups):
            raise ConfigError(
                "deploy.vpc_subnets and deploy.vpc_security_groups: set both or neither"
            )
        if subnets and len(subnets) < 2:
            raise ConfigError(
                "deploy.vpc_subnets: at least two, in different availability zones (SageMaker "
                f"hosting needs them even for one instance; got {len(subnets)})"
            )
        for name, values, pattern, most in (
            ("vpc_subnets", subnets, _SUBNET, 16),
            ("vpc_security_groups", groups, _SECURITY_GROUP, 5),
        ):
            if len(values) > most:
                raise ConfigError(f"deploy.{name}: at most {most} (got {len(values)})")
            for value in values:
                if not pattern.match(value):
                    raise ConfigError(f"deploy.{name}: {value!r} is not such an id")

    # ------------------------------------------------------------ lists and derived settings

    @property
    def subnets(self) -> list[str]:
        return _items(self.vpc_subnets)

    @property
    def security_groups(self) -> list[str]:
        return _items(self.vpc_security_groups)

    @property
    def subscriptions(self) -> list[tuple[str, str]]:
        """(protocol, endpoint) of each alarm subscription: email, https or sqs."""
        return [_subscription(item) for item in _items(self.alarm_subscriptions)]

    @property
    def kms_alias(self) -> str:
        """The alias of the key deploy makes (kms_key 'create')."""
        return f"alias/avatarforge/{self.name}"

    @property
    def alarm_topic_name(self) -> str:
        return f"{self.name}-alarms"

    # ------------------------------------------------------------ derived names and paths

    def key(self, *parts: str) -> str:
        """``<prefix><parts...>``: an object key (or key prefix) in the bucket."""
        return self.prefix + "/".join(parts)

    def s3(self, *parts: str) -> str:
        """``s3://<bucket>/<prefix><parts...>`` (a trailing '/' is kept)."""
        if not self.bucket:
            raise ConfigError("deploy.bucket: required for this command")
        return f"s3://{self.bucket}/{self.prefix}" + "/".join(parts)

    @property
    def photos_prefix(self) -> str:
        return self.s3("photos/")

    @property
    def models_prefix(self) -> str:
        return self.s3("models/")

    @property
    def shared_prefix(self) -> str:
        return self.s3("shared/")

    @property
    def jobs_prefix(self) -> str:
        return self.s3("jobs/")

    @property
    def async_output_prefix(self) -> str:
        return self.s3("async/out/")

    @property
    def async_failure_prefix(self) -> str:
        return self.s3("async/failed/")

    @property
    def mme_endpoint_name(self) -> str:
        return f"{self.name}-mme"

    @property
    def training_endpoint_name(self) -> str:
        return f"{self.name}-training"

    @property
    def success_topic_name(self) -> str:
        return f"{self.name}-training-succeeded"

    @property
    def error_topic_name(self) -> str:
        return f"{self.name}-training-failed"

    @property
    def training_deadline_s(self) -> int:
        """How long one training job may run inside the service: the invocation timeout less a
        margin (up to 300 s) for writing the result and failure record before SageMaker gives up."""
        return self.training_timeout_s - min(300, self.training_timeout_s // 4)

    @property
    def tag(self) -> dict[str, str]:
        """The tag on everything deploy creates; destroy removes only what carries it."""
        return {"Key": "avatarforge:deployment", "Value": self.name}
