"""Image URIs of the AWS Deep Learning Containers we deploy, and the Python each Triton tag needs.

The URIs come from the sagemaker SDK (v3: ``sagemaker.core.image_uris.retrieve`` in
sagemaker-core, the deploy extra): its tables (``sagemaker/core/image_uri_config/``) list, for
each image version, the regions it is published in and the registry account of each. A tag the
SDK does not list for a region is refused with the SDK's own list, before anything is deployed.
The SDK is imported on first use only (a few seconds): the cloud client never needs it.

- SageMaker Triton: ``<account>.dkr.ecr.<region>.amazonaws.com/sagemaker-tritonserver:<ver>-py3``
  (framework ``sagemaker-tritonserver``). Its python backend stub embeds the image's Python, and
  an ``EXECUTION_ENV_PATH`` environment must be built for that same Python ("The version of the
  Python interpreter in the execution environment must match the version of
  triton_python_backend_stub"): images up to 24.10 are Ubuntu 22.04 with Python 3.10, 24.11 and
  later Ubuntu 24.04 with Python 3.12. That is not in the SDK's table: :data:`STUB_PYTHON`.
- LMI (DJL Serving): ``.../djl-inference:<tag>`` (framework ``djl-lmi``, version = the tag's
  first part); our training image is built FROM it.
"""

from __future__ import annotations

import functools
import re

from ..settings import ConfigError

TRITON_FRAMEWORK = "sagemaker-tritonserver"
LMI_FRAMEWORK = "djl-lmi"

# (first Triton version, its stub's Python), newest first; up to NEWEST_KNOWN_TRITON.
STUB_PYTHON = (((24, 11), "3.12"), ((0, 0), "3.10"))
NEWEST_KNOWN_TRITON = (26, 5)
_TRITON_TAG = re.compile(r"^(\d\d)\.(\d\d)-py3$")
_LMI_TAG = re.compile(r"^(\d+\.\d+\.\d+)-\S+$")
_INSTALL_HINT = (
    "the image lookup needs sagemaker-core (the deploy extra: `make setup`, or "
    "`pip install --no-deps sagemaker-core==2.27.0` beside `pip install avatarforge[deploy]`)"
)


def triton_version(tag: str) -> str:
    """'25.09-py3' -> '25.09'; a clear error for what is not a GPU tag's shape.

    Whether the tag is published (and where) is the SDK's answer: :func:`triton_image_uri`.
    """
    match = _TRITON_TAG.match(tag)
    if not match:
        raise ConfigError(
            f"deploy.triton_image_tag: {tag!r} is not a SageMaker Triton GPU tag "
            "(<yy>.<mm>-py3, e.g. 25.09-py3)"
        )
    return f"{match[1]}.{match[2]}"


def triton_python(tag: str) -> str:
    """The Python version ('3.12') the Triton image's python backend stub is built for."""
    version = triton_version(tag)
    key = tuple(int(part) for part in version.split("."))
    if key > NEWEST_KNOWN_TRITON:
        raise ConfigError(
            f"deploy.triton_image_tag: the python stub's Python of Triton {version} is not "
            f"known here (known up to {NEWEST_KNOWN_TRITON[0]}.{NEWEST_KNOWN_TRITON[1]:02d}); "
            "read it in the image (python3 --version) and add it to "
            "avatarforge.deploy.images.STUB_PYTHON"
        )
    return next(python for first, python in STUB_PYTHON if key >= first)


@functools.cache
def _retrieve(framework: str, region: str, version: str, instance_type: str | None) -> str:
    try:
        from sagemaker.core import image_uris
    except ImportError as exc:
        raise ConfigError(f"no {framework} image URI: {_INSTALL_HINT} ({exc})") from None
    try:
        return image_uris.retrieve(
            framework,
            region=region,
            version=version,
            instance_type=instance_type,
            image_scope="inference",
        )
    except ValueError as exc:  # the SDK's message lists what it knows
        raise ConfigError(str(exc)) from None


def _field_error(field_name: str, tag: str, region: str, exc: ConfigError) -> ConfigError:
    return ConfigError(f"{field_name} {tag!r} in deploy.region {region!r}: {exc}")


def triton_image_uri(region: str, tag: str, instance_type: str = "ml.g5.2xlarge") -> str:
    """The SageMaker Triton image of ``tag`` in ``region``'s registry, for ``instance_type``
    (the SDK picks the GPU or CPU image by it)."""
    version = triton_version(tag)
    try:
        return _retrieve(TRITON_FRAMEWORK, region, version, instance_type)
    except ConfigError as exc:
        raise _field_error("deploy.triton_image_tag", tag, region, exc) from None


def lmi_image_uri(region: str, tag: str) -> str:
    """The LMI (djl-inference) image our training image is built FROM; ``tag`` must be the one
    the SDK lists for its version ('0.36.0-lmi27.0.0-cu130' is version 0.36.0)."""
    match = _LMI_TAG.match(tag)
    if not match:
        raise ConfigError(
            f"deploy.lmi_image_tag: {tag!r} is not an LMI tag (<version>-lmi<n>-cu<n>, "
            "e.g. 0.36.0-lmi27.0.0-cu130)"
        )
    try:
        uri = _retrieve(LMI_FRAMEWORK, region, match[1], None)
    except ConfigError as exc:
        raise _field_error("deploy.lmi_image_tag", tag, region, exc) from None
    if not uri.endswith(f":{tag}"):
        raise ConfigError(
            f"deploy.lmi_image_tag: the sagemaker SDK's LMI {match[1]} image is "
            f"{uri.rsplit(':', 1)[-1]!r}, not {tag!r}"
        )
    return uri


_ECR_URI = re.compile(
    r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com/"
    r"(?P<repository>[a-z0-9][a-z0-9._/-]*)(?::(?P<tag>[\w.-]+)|@sha256:[0-9a-f]{64})$"
)


def parse_ecr_uri(uri: str, field_name: str = "deploy.training_image_uri") -> dict[str, str]:
    """``<account>.dkr.ecr.<region>.amazonaws.com/<repo>:<tag>`` -> its parts (ConfigError else).

    SageMaker pulls only from ECR, so the training image must be an ECR URI.
    """
    match = _ECR_URI.match(uri)
    if not match:
        raise ConfigError(
            f"{field_name}: not an ECR image URI "
            f"(<account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>; got {uri!r})"
        )
    return {k: v or "" for k, v in match.groupdict().items()}


def ecr_repository_arn(region: str, account: str, repository: str) -> str:
    return f"arn:aws:ecr:{region}:{account}:repository/{repository}"


def image_repository_arn(uri: str) -> str:
    """The ECR repository ARN of an image URI (what a role needs to pull it)."""
    parts = parse_ecr_uri(uri, "image")
    return ecr_repository_arn(parts["region"], parts["account"], parts["repository"])


@functools.cache
def inference_ami_versions() -> tuple[str, ...]:
    """The ``InferenceAmiVersion`` values the SageMaker API accepts, from botocore's model of it
    (each AMI fixes an NVIDIA driver and CUDA version; botocore's documentation lists them)."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    return tuple(model.shape_for("ProductionVariantInferenceAmiVersion").enum)


def inference_ami(version: str) -> dict[str, str]:
    """The production variant's ``InferenceAmiVersion`` field ({} for SageMaker's default)."""
    if not version:
        return {}
    known = inference_ami_versions()
    if version not in known:
        raise ConfigError(
            f"deploy.inference_ami_version: {version!r} is not one the SageMaker API accepts "
            f"(botocore lists: {', '.join(known)}; '' for SageMaker's default)"
        )
    return {"InferenceAmiVersion": version}
