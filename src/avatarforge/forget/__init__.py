"""Forget a user: delete what avatarforge stored of them, unload them from running servers, and
say what was removed and what stays.

Where a user's data lands, and what removes it:

- the build folder (:mod:`.local`): photos, dataset, training output (adapter, checkpoints),
  package and its digest, exports, generated images, avatars, eval report, local-triton's
  repository copy, the local MME's untarred copy. Class images are not a user's: the base makes
  them from the class prompt, and every user shares them.
- running servers of this machine (:mod:`.servers`): local-triton (found by its control key)
  and the local MME (its tritonserver's SageMaker front end, given by URL).
- a deployment's bucket (:mod:`.deployment`): photos, TargetModel and digest, the user's job
  folders (request, submission, claim, checkpoint, result) and their async outputs.
- the training service keeps nothing: a job's scratch folder (downloaded photos, dataset,
  checkpoints, package) is removed when the job ends, also when SIGTERM ends it
  (:mod:`avatarforge.jobs.run`).

Everything is found by exact name or exact ``<folder>/<user>/`` prefix, so forgetting ``al``
never touches ``alice``; running it again finds nothing and changes nothing.
"""

from __future__ import annotations

from ..deploy.config import DeployConfig
from ..names import check_user_id
from .deployment import forget_deployment
from .local import forget_local
from .report import Removal, Report
from .servers import unload_local_mme, unload_local_triton

__all__ = ["Removal", "Report", "forget"]


def forget(
    user: str,
    *,
    local: bool = True,
    deployment: DeployConfig | None = None,
    mme_sagemaker_url: str | None = None,
    dry_run: bool = False,
    session=None,
) -> Report:
    """Forget ``user`` (refused before anything is touched unless it is a valid user id):
    unload from running servers first (then their copies of the files go), the build folder,
    then the deployment's objects. ``dry_run``: find and report only."""
    check_user_id(user)
    report = Report(user, dry_run=dry_run)
    if mme_sagemaker_url:
        unload_local_mme(user, mme_sagemaker_url, report)
    if local:
        unload_local_triton(user, report)
        forget_local(user, report)
    if deployment is not None:
        forget_deployment(user, deployment, report, session=session)
    return report
