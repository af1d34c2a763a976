"""handle_invocation: one async invocation's body in, the result JSON out (or a JobError).

This is the one function every server adapter wraps: the DJL entry point
(``training_container/model.py``), the local async-endpoint runner, the CLI. An adapter only
maps :class:`JobError` to its own way of failing (``status``: 4xx the request's fault, 5xx ours).
"""

from __future__ import annotations

import json
import logging

from ..base.identity import BaseInfo
from ..settings import ConfigError
from .config import ServiceConfig
from .errors import JobError, JobRequestError
from .request import parse_request
from .run import resolve_service_base, run_job

log = logging.getLogger(__name__)
# What an invocation may be sent as. SageMaker passes the ContentType of InvokeEndpointAsync
# (octet-stream when the caller gives none).
JSON_TYPES = ("application/json", "text/json", "text/plain", "application/octet-stream")


def service_config(config: ServiceConfig | None = None) -> ServiceConfig:
    """``config``, or the one the environment describes (a misconfiguration is our fault)."""
    if config is not None:
        return config
    try:
        return ServiceConfig.from_env()
    except ConfigError as exc:
        raise JobError(f"the training service is misconfigured: {exc}") from None


def warm_up(config: ServiceConfig | None = None) -> BaseInfo:
    """Check the service's settings and make its base present (at model load, before the first
    job): a misconfigured instance fails at start, not one job at a time."""
    config = service_config(config)
    try:
        config.models_prefix  # noqa: B018 (what a job may touch is the deployment's: required)
    except ConfigError as exc:
        raise JobError(f"the training service is misconfigured: {exc}") from None
    for folder in (config.work_path(), config.slots_path()):
        folder.mkdir(parents=True, exist_ok=True)
    return resolve_service_base(config)


def check_content_type(content_type: str | None) -> None:
    if not content_type:
        return
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind in JSON_TYPES or kind.endswith("+json"):
        return
    raise JobRequestError(
        f"content type {content_type!r}: send the job request as application/json",
        status=415,
    )


def handle_invocation(
    body: bytes, content_type: str | None = None, config: ServiceConfig | None = None
) -> bytes:
    """Run the job the JSON ``body`` asks for; the result as JSON bytes.

    Raises :class:`JobError` for every failure (``client_fault``/``status`` say whose), never
    returns a failure as if it were a result.
    """
    config = service_config(config)
    check_content_type(content_type)
    request = parse_request(body, config)
    log.info("job %s for user %s: started", request.job_id, request.user)
    result = run_job(request, config)
    log.info(
        "job %s: %s written (%d steps, %.0f s)",
        request.job_id,
        result.model_uri,
        result.steps,
        result.seconds.get("total", 0.0),
    )
    return (json.dumps(result.to_dict(), indent=2) + "\n").encode()
