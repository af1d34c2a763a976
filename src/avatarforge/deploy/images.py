"""Image URIs of the AWS Deep Learning Containers we deploy, and the Python each Triton tag needs.

Our own table, not the ``sagemaker`` SDK's ``image_uris.retrieve``: the SDK (v3) cannot be
installed beside our pins (sagemaker-core requires rich < 15; we pin rich 15) and would pull
pandas, scipy and paramiko for one lookup. The registry accounts and tags below are those of the
AWS Deep Learning Containers image list, as looked up when this was written; a new tag or region
is one line here.

- SageMaker Triton: ``<account>.dkr.ecr.<region>.amazonaws.com/sagemaker-tritonserver:<ver>-py3``.
  Its python backend stub embeds the image's Python, and an ``EXECUTION_ENV_PATH`` environment
  must be built for that same Python ("The version of the Python interpreter in the execution
  environment must match the version of triton_python_backend_stub"): images up to 24.10 are
  Ubuntu 22.04 with Python 3.10, 24.11 and later Ubuntu 24.04 with Python 3.12.
- LMI (DJL Serving): ``.../djl-inference:<tag>``; our training image is built FROM it.
"""

from __future__ import annotations

import re

from ..settings import ConfigError

TRITON_REPOSITORY = "sagemaker-tritonserver"
LMI_REPOSITORY = "djl-inference"

# Most regions pull Deep Learning Containers from one account; opt-in regions have their own.
_MAIN_ACCOUNT = "763104351884"
_MAIN_REGIONS = (
    "us-east-1", "us-east-2", "us-west-1", "us-west-2",
    "eu-west-1", "eu-west-2", "eu-west-3", "eu-central-1", "eu-north-1",
    "ap-northeast-1", "ap-northeast-2", "ap-south-1", "ap-southeast-1", "ap-southeast-2",
    "ca-central-1", "sa-east-1",
)  # fmt: skip
DLC_ACCOUNTS: dict[str, str] = {region: _MAIN_ACCOUNT for region in _MAIN_REGIONS} | {
    "af-south-1": "626614931356",
    "ap-east-1": "871362719292",
    "ap-northeast-3": "364406365360",
    "ap-southeast-3": "907027046896",
    "eu-south-1": "692866216735",
    "me-south-1": "217643126080",
    "il-central-1": "780543022126",
    "me-central-1": "914824155844",
    "eu-central-2": "380420809688",
    "ap-south-2": "772153158452",
    "eu-south-2": "503227376785",
    "ap-southeast-4": "457447274322",
    "ca-west-1": "204538143572",
}

# Published SageMaker Triton versions (GPU tag "<version>-py3") and their stub's Python.
TRITON_VERSIONS: dict[str, str] = {
    "23.12": "3.10",
    "24.01": "3.10",
    "24.03": "3.10",
    "24.05": "3.10",
    "24.09": "3.10",
    "25.04": "3.12",
    "25.09": "3.12",
    "26.05": "3.12",
}
_TRITON_TAG = re.compile(r"^(\d\d)\.(\d\d)-py3$")


def dlc_account(region: str) -> str:
    """The AWS account that hosts the Deep Learning Containers in ``region``."""
    try:
        return DLC_ACCOUNTS[region]
    except KeyError:
        raise ConfigError(
            f"deploy.region: no SageMaker Triton/LMI image registry known for {region!r} "
            f"(known: {', '.join(sorted(DLC_ACCOUNTS))})"
        ) from None


def _registry(region: str) -> str:
    return f"{dlc_account(region)}.dkr.ecr.{region}.amazonaws.com"


def triton_version(tag: str) -> str:
    """'25.09-py3' -> '25.09'; a clear error for a tag that is not a published GPU tag."""
    match = _TRITON_TAG.match(tag)
    if not match or f"{match[1]}.{match[2]}" not in TRITON_VERSIONS:
        raise ConfigError(
            f"deploy.triton_image_tag: {tag!r} is not a known SageMaker Triton GPU tag "
            f"(one of {', '.join(v + '-py3' for v in TRITON_VERSIONS)})"
        )
    return f"{match[1]}.{match[2]}"


def triton_python(tag: str) -> str:
    """The Python version ('3.12') the Triton image's python backend stub is built for."""
    return TRITON_VERSIONS[triton_version(tag)]


def triton_image_uri(region: str, tag: str) -> str:
    """The SageMaker Triton image of ``tag`` in ``region``'s registry."""
    triton_version(tag)  # refuse unknown tags here too
    return f"{_registry(region)}/{TRITON_REPOSITORY}:{tag}"


def lmi_image_uri(region: str, tag: str) -> str:
    """The LMI (djl-inference) image our training image is built FROM."""
    return f"{_registry(region)}/{LMI_REPOSITORY}:{tag}"


_ECR_URI = re.compile(
    r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com/"
    r"(?P<repository>[a-z0-9][a-z0-9._/-]*)(?::(?P<tag>[\w.-]+)|@sha256:[0-9a-f]{64})$"
)


def parse_ecr_uri(uri: str) -> dict[str, str]:
    """``<account>.dkr.ecr.<region>.amazonaws.com/<repo>:<tag>`` -> its parts (ConfigError else).

    SageMaker pulls only from ECR, so the training image must be an ECR URI.
    """
    match = _ECR_URI.match(uri)
    if not match:
        raise ConfigError(
            "deploy.training_image_uri: not an ECR image URI "
            f"(<account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>; got {uri!r})"
        )
    return {k: v or "" for k, v in match.groupdict().items()}


def ecr_repository_arn(region: str, account: str, repository: str) -> str:
    return f"arn:aws:ecr:{region}:{account}:repository/{repository}"
