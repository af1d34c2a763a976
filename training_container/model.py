"""DJL Serving (LMI) entry point of the avatarforge training service: one async invocation is
one training job.

DJL loads this file (``option.entryPoint``) and calls ``handle`` once with an empty Input when
the model loads, then once per request with the body under "data" and the HTTP headers as
properties. All the work is ``avatarforge.jobs.handle_invocation``, tested outside any server;
this file only maps its outcome to DJL's Output. A JobError becomes a non-2xx status, so
SageMaker marks the invocation failed (S3FailurePath, ErrorTopic): never a success-shaped error.

DJL answers /ping 200 while a worker still runs its load-time call and queues the requests that
come meanwhile, so on an instance scaled from zero a job can arrive during ``warm_up()``: it
waits, then runs. SageMaker's InvocationTimeoutSeconds counts that wait and DJL does not say how
long it was, so the first job handed over right after the warm-up is charged the warm-up's time:
it stops in time to save its checkpoint, before SageMaker gives up on it.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from djl_python import Input, Output

from avatarforge.jobs import JobError, handle_invocation, warm_up
from avatarforge.jobs.handler import service_config

log = logging.getLogger("avatarforge.training_container")
HANDOVER_S = 1.0  # DJL hands a queued job to a worker within milliseconds of its warm-up
_warm: list[float] = []  # [start, end] of this worker's load-time call (once per process)


def _waited_s() -> float:
    """How long the job handed over now may have waited in DJL's queue for the warm-up."""
    if len(_warm) != 2 or time.monotonic() - _warm[1] > HANDOVER_S:
        return 0.0
    start, end = _warm
    _warm.append(0.0)  # only the first job is charged
    return end - start


def handle(inputs: Input) -> Output | None:
    if inputs.is_empty():  # DJL drops an empty body: only the first empty call is the load
        if _warm:
            return Output().error("empty request: send the job request JSON", code=400)
        started = time.monotonic()
        base = warm_up()  # check the settings, fetch the base before any job
        _warm[:] = [started, time.monotonic()]
        log.info("training service ready on base %s (%s)", base.base_id, base.content_hash[:12])
        return None  # DJL answers the load-time call with 204
    try:
        config = service_config()
        if waited := _waited_s():
            budget = max(config.deadline_s - waited, config.finish_reserve_s + 1.0)
            config = dataclasses.replace(config, deadline_s=budget)
            log.info("the job waited up to %.0f s for the warm-up: deadline %.0f s", waited, budget)
        body = handle_invocation(inputs.get_as_bytes(), inputs.get_property("Content-Type"), config)
    except JobError as exc:
        message = "bad training request" if exc.client_fault else "training job failed"
        return Output().error(str(exc), code=exc.status, message=message)
    return Output().add_property("content-type", "application/json").add(body)
