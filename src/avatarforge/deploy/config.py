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
        60, "target of SageMakerVariantInvocationsPerInstance (per minute) for MME scaling", ge=1
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
    training_role_arn: str = setting(
        "", "IAM role of the training endpoint (empty: role_arn; least privilege: its own role)"
    )

    def validate(self) -> None:
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
