"""DJL Serving (LMI) entry point of the avatarforge training service: one async invocation is
one training job.

DJL loads this file (``option.entryPoint``) and calls ``handle`` once with an empty Input when
the model loads, then once per request with the body under "data" and the HTTP headers as
properties. All the work is ``avatarforge.jobs.handle_invocation``, tested outside any server;
this file only maps its outcome to DJL's Output. A JobError becomes a non-2xx status, so
SageMaker marks the invocation failed (S3FailurePath, ErrorTopic): never a success-shaped error.
"""

from __future__ import annotations

import logging

from djl_python import Input, Output

from avatarforge.jobs import JobError, handle_invocation, warm_up

log = logging.getLogger("avatarforge.training_container")
_loaded = False  # DJL's load-time call comes first, once per worker process


def handle(inputs: Input) -> Output | None:
    global _loaded
    if inputs.is_empty():  # DJL drops an empty body: only the first empty call is the load
        if _loaded:
            return Output().error("empty request: send the job request JSON", code=400)
        base = warm_up()  # check the settings, fetch the base before any job
        log.info("training service ready on base %s (%s)", base.base_id, base.content_hash[:12])
        _loaded = True
        return None  # DJL answers the load-time call with 204
    try:
        body = handle_invocation(inputs.get_as_bytes(), inputs.get_property("Content-Type"))
    except JobError as exc:
        message = "bad training request" if exc.client_fault else "training job failed"
        return Output().error(str(exc), code=exc.status, message=message)
    return Output().add_property("content-type", "application/json").add(body)
