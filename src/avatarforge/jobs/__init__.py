"""The training service: one job turns photos in S3 into a servable ``<user>.tar.gz``.

A job is one asynchronous invocation of the training endpoint (the LMI / DJL Serving container
in ``training_container/``). Everything around it is an adapter over :func:`handle_invocation`
(bytes in, result JSON out) and :func:`run_job` (a validated request in, a result out):

- :mod:`.request`  the request schema: :func:`parse_request` -> :class:`JobRequest`
- :mod:`.config`   :class:`ServiceConfig`: limits, deadline, slots, presets (from the env)
- :mod:`.run`      :func:`run_job`: fetch -> preprocess -> train -> package -> upload
- :mod:`.store`    the job's S3 folder: checkpoint.tar.gz and result.json
- :mod:`.claim`    claim.json: a job id names one request and runs once at a time anywhere
- :mod:`.slots`    at most N jobs train at once per instance (flock slots); more wait
- :mod:`.result`   :class:`JobResult`, the result JSON
- :mod:`.errors`   :class:`JobError` (``status``, ``client_fault``) and its subclasses
- :mod:`.handler`  :func:`handle_invocation`, :func:`warm_up`
"""

from .config import ServiceConfig
from .errors import JobError, JobRequestError, JobTimeoutError
from .handler import handle_invocation, warm_up
from .request import JobRequest, parse_request
from .result import JobResult
from .run import JobEvent, resolve_service_base, run_job

__all__ = [
    "JobError",
    "JobEvent",
    "JobRequest",
    "JobRequestError",
    "JobResult",
    "JobTimeoutError",
    "ServiceConfig",
    "handle_invocation",
    "parse_request",
    "resolve_service_base",
    "run_job",
    "warm_up",
]
