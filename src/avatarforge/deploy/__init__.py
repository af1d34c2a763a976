"""Deploy avatarforge on SageMaker: the MME (Triton) endpoint, the async training endpoint, S3.

- :class:`DeployConfig` — the one deployment description (also read by the cloud client).
- :func:`make_plan` / :func:`execute` — plan a command ("mme", "training", "destroy") against
  what exists (or against nothing, for a dry run) and carry it out.
- :func:`plan_mme`, :func:`plan_training`, :func:`plan_destroy` — the pure planners.
- :func:`mme_policy`, :func:`training_policy`, :func:`trust_policy` — IAM policy documents.
- :func:`triton_image_uri`, :func:`triton_python`, :func:`lmi_image_uri` — image table.
- :mod:`.security` (KMS key, VPC, why no network isolation), :mod:`.operations` (S3 lifecycle,
  log retention, alarms and their SNS subscriptions), :mod:`.throughput` (the measured images
  per minute behind the MME's scaling target and the plan's costs).
"""

from .assets import AssetError, MMEAssets, base_asset, env_asset, inspect_env_tarball
from .aws import DeployError, make_clients
from .config import DeployConfig
from .images import lmi_image_uri, triton_image_uri, triton_python
from .mme import plan_mme
from .plan import Plan, Resource, plan_destroy
from .policies import mme_policy, training_policy, trust_policy
from .run import execute, make_plan
from .training import plan_training

__all__ = [
    "AssetError",
    "DeployConfig",
    "DeployError",
    "MMEAssets",
    "Plan",
    "Resource",
    "base_asset",
    "env_asset",
    "execute",
    "inspect_env_tarball",
    "lmi_image_uri",
    "make_clients",
    "make_plan",
    "mme_policy",
    "plan_destroy",
    "plan_mme",
    "plan_training",
    "training_policy",
    "triton_image_uri",
    "triton_python",
    "trust_policy",
]
