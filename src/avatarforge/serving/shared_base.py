"""The shared base: one pipeline of the base, user adapters switched in per request (what the
shared base's Triton model, ``triton_models/shared_base.py``, runs; starting that model is
:class:`.bootstrap.SharedBaseModel`'s).

Its settings are the instance's (:meth:`.ServingConfig.from_env`), never a package's; it answers
only this instance's user models (:class:`.callers.Callers`) and counts every answer per user
(:class:`.bootstrap.RequestCounters`). :class:`LoadingSharedBase` loads the pipeline in a
thread, so the model is up in seconds and answers "loading, retry" until the pipeline is.

Adapters are activated by a copy into preallocated LoRA slots (:class:`SlotAdapterCache`);
with ``batching`` on, the rows of a Triton batch that share size, steps, scheduler, guidance and
num_images run as one pipeline call with a LoRA per row (:func:`handler.handle_batched`), and a
row alone runs exactly as ``generate_images`` with its adapter loaded. Off: one row at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..adapter import AdapterError
from ..base.identity import BaseError
from ..base.tiny import TINY_ID_PREFIX
from ..cpu_threads import quiet_cpu_threads
from ..generate import GenArgs, GenerationStopped, generate_batch, generate_images
from . import bootstrap, schema
from .adapter_cache import SlotAdapterCache
from .callers import Callers
from .config import (
    ADAPTER_CACHE_MIB,
    ADAPTER_CACHE_SIZE,
    BATCH_MAX_IMAGES,
    MAX_REQUEST_COST,
    MAX_RESPONSE_BYTES,
    REQUEST_TIMEOUT_S,
    ModelParams,
    ServingConfig,
)
from .handler import (
    CLIENT_ERRORS,
    DeadlineExceeded,
    InternalError,
    Job,
    RequestError,
    TimeBudget,
    as_request_error,
    handle_batched,
    handle_requests,
    past,
    too_long_advice,
    waited_words,
)
from .pace import Pace, RunClock, StepShape
from .safety import SafetyCheck

log = logging.getLogger(__name__)

# An adapter that is missing, broken or trained on another base is the caller's problem.
BASE_CLIENT_ERRORS = (*CLIENT_ERRORS, AdapterError, BaseError)


class SharedBase:
    def __init__(
        self,
        pipe,
        base,
        cache_size: int = ADAPTER_CACHE_SIZE,
        *,
        cache_mib: int = ADAPTER_CACHE_MIB,
        batching: bool = True,
        batch_max_images: int = BATCH_MAX_IMAGES,
        max_request_cost: int = MAX_REQUEST_COST,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        callers: Callers | None = None,
        counters: bootstrap.RequestCounters | None = None,
        defaults: GenArgs | None = None,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        pace: Pace | None = None,
        safety: SafetyCheck | None = None,
    ) -> None:
        self.pipe, self.base = pipe, base
        self.max_request_cost, self.max_response_bytes = max_request_cost, max_response_bytes
        # what a request's omitted gen_args fields take (None: GenArgs' own), and the time it
        # has, judged by the pace this base's pipeline calls measure
        self.defaults = defaults
        self.budget = TimeBudget(request_timeout_s, pace or Pace())
        # None: anyone may call (a SharedBase in this process, as the tests and benches use it)
        self.callers, self.counters = callers, counters
        self.safety = safety  # None: answers are not checked (serving.safety_checker empty)
        self.batching, self.batch_max_images = batching, batch_max_images
        self.cache = SlotAdapterCache(
            pipe,
            base,
            slots=batch_max_images,
            host_cache_bytes=cache_mib * 2**20,
            fallback_capacity=cache_size,
        )

    @classmethod
    def from_params(
        cls,
        params: ModelParams,
        instance_kind: str,
        device_id: str = "0",
        environ=None,
        pb_utils=None,
    ):
        """From its config parameters and the instance's environment: the base is fetched from
        AVATARFORGE_BASE_SOURCE into the shared dir if not there yet, and must have the hash
        the config names; the settings are the instance's (serving.device: Triton's instance
        kind decides where "auto" runs). ``pb_utils``: Triton's module, for its /metrics."""
        from ..base.pipeline import INDUCTOR_CACHE, load_pipeline, prepare_for_serving
        from .shared_files import ensure_base, ensure_folder

        instance = bootstrap.Instance(environ)
        serving = ServingConfig.from_env(environ)
        started = time.monotonic()
        base = ensure_base(
            instance.base_source,
            instance.shared_dir,
            expected_hash=params.base_hash,
            base_id=params.base_id,
            verify=True,  # once per start of the shared base: every byte it will serve
        )
        present = time.monotonic()
        log.info("base %s present and verified in %.1f s", base.base_id, present - started)
        device = _device(serving.device, instance_kind, device_id)
        if device == "cpu":
            quiet_cpu_threads()  # before torch loads (load_pipeline)
        pipe = load_pipeline(base, device)
        log.info("pipeline loaded on %s in %.1f s", device, time.monotonic() - present)
        safety = None
        if serving.safety_checker:
            folder = ensure_folder(serving.safety_checker, instance.shared_dir, "safety")
            safety = SafetyCheck.load(folder, device)
        tiny_on_cpu = device == "cpu" and base.base_id.startswith(TINY_ID_PREFIX)
        defaults = serving.gen_defaults(tiny_on_cpu=tiny_on_cpu)
        log.info(
            "a request that leaves them out gets %d x %d px and %d steps (serving.default_size "
            "and default_steps: %s)",
            defaults.width, defaults.height, defaults.steps,
            "set" if serving.default_size or serving.default_steps else "by device and base",
        )  # fmt: skip
        shared = cls(
            pipe,
            base,
            serving.adapter_cache_size,
            cache_mib=serving.adapter_cache_mib,
            batching=serving.batching,
            batch_max_images=serving.batch_max_images,
            max_request_cost=serving.max_request_cost,
            max_response_bytes=serving.max_response_bytes,
            callers=Callers(
                lambda: bootstrap.instance_key(instance.shared_dir),
                base.content_hash,
                serving.request_timeout_s,
            ),
            counters=bootstrap.RequestCounters(pb_utils, serving.metrics_log_s),
            defaults=defaults,
            request_timeout_s=serving.request_timeout_s,
            safety=safety,
        )
        # compiled once the LoRA slots hook into the UNet (later hooks would not be traced),
        # warmed up with the bare base's plan (the graph of every user); the kernels cached
        # in the shared dir, so a restart or a second instance reuses them
        seconds = prepare_for_serving(
            shared.pipe,
            serving.torch_compile,
            instance.shared_dir / INDUCTOR_CACHE,
            before_warm_up=lambda: shared.cache.activate(None),
        )
        if seconds:
            log.info("UNet compiled and warmed up in %.1f s (serving.torch_compile)", seconds)
        return shared

    def generate(self, prompt: str, negative: str | None, args: GenArgs, adapter: str | None):
        self.cache.activate(adapter)
        clock = RunClock(None)
        try:
            return generate_images(self.pipe, prompt, negative, args, on_step=clock.step)
        finally:
            self._record(StepShape.of([args]), clock)

    def generate_jobs(self, jobs: list[Job]) -> list[list]:
        """Rows sharing a batch key as one pipeline call (one row: exactly `generate`). It
        stops between two steps once every client of the call has stopped waiting, or once
        the rest cannot end before then at the fastest pace known (:class:`.pace.RunClock`)."""
        deadlines = [job.deadline for job in jobs]
        last = None if None in deadlines else max(deadlines)
        shape = StepShape.of([job.row.args for job in jobs])
        clock = RunClock(last, self.budget.pace.fastest(shape))
        stop = None if last is None else (lambda: past(last) or clock.hopeless())
        try:
            if len(jobs) == 1:
                (job,) = jobs
                self.cache.activate(job.adapter)
                row = job.row
                clock.begin()
                return [generate_images(self.pipe, row.prompt, row.negative_prompt, row.args,
                                        stop=stop, on_step=clock.step)]  # fmt: skip
            rows = [(job.row.prompt, job.row.negative_prompt, job.row.args) for job in jobs]
            with self.cache.rows([job.adapter for job in jobs], jobs[0].row.args.num_images):
                clock.begin()
                return generate_batch(self.pipe, rows, stop=stop, on_step=clock.step)
        except GenerationStopped:
            raise self._stopped(clock) from None
        finally:
            self._record(shape, clock)

    def _record(self, shape: StepShape, clock: RunClock) -> None:
        if (step_s := clock.measured_s()) is not None:
            self.budget.pace.record(shape, step_s)

    def _stopped(self, clock: RunClock) -> DeadlineExceeded:
        """What a call stopped between two steps answers: how far it got, after how long a
        wait, and, when its pace needs more than the whole timeout, what to change."""
        timeout_s = self.budget.timeout_s
        assert clock.deadline is not None  # only a call with a deadline is stopped
        waited = clock.started - (clock.deadline - timeout_s)
        elapsed = clock.elapsed_s()
        what = (
            f"stopped after {clock.done} of {clock.total} denoising steps, {elapsed:.0f} s after "
            f"it started ({elapsed / max(clock.done, 1):.2f} s a step)"
        )
        if waited >= 1:
            what += f"; {waited_words(waited)}"
        rest = clock.least_rest_s()
        if not past(clock.deadline) and rest is not None:
            what += (
                f": the rest needs at least {rest:.0f} s at the fastest pace known, "
                f"{clock.deadline - time.time():.0f} s were left"
            )
        pace = clock.pace_s() or clock.fastest
        if pace is not None and clock.total * pace > timeout_s:
            fits = int(timeout_s / pace)
            advice = (
                f"at this pace the request needs about {clock.total * pace:.0f} s, "
                f"{too_long_advice(timeout_s, fits)}"
            )
        else:
            advice = "retry"
        return DeadlineExceeded(what, advice, timeout_s=timeout_s)

    def handle(self, requests) -> list:
        """One result per request, in order (the output array or the RequestError to send);
        requests not from this instance's user models are refused before anything else."""
        users: list[str] = []
        accepted, results = [], {}
        for i, inputs in enumerate(requests):
            try:
                users.append(self.callers.check(inputs) if self.callers else "")
                accepted.append(i)
            except RequestError as exc:
                users.append("unknown")
                results[i] = exc
        for i, result in zip(accepted, self._handle([requests[i] for i in accepted]), strict=True):
            results[i] = result
        out = [results[i] for i in range(len(requests))]
        flagged = self.safety.screen(out) if self.safety is not None else [0] * len(out)
        for user, count, result in zip(users, flagged, out, strict=True):
            if count:
                log.warning("safety check: %d of %d images for %s replaced by black images",
                            count, result.size, user)  # fmt: skip
            if self.counters is not None:
                self.counters.add(user, bootstrap.outcome(error_message(result)))
                if count:
                    self.counters.add(user, bootstrap.FLAGGED, count)
        return out

    def _handle(self, requests) -> list:
        if not requests:
            return []
        limits = {
            "max_cost": self.max_request_cost,
            "max_response_bytes": self.max_response_bytes,
            "defaults": self.defaults,
            "budget": self.budget,
        }
        if not self.batching:
            return handle_requests(
                requests, self.generate, schema.BASE_INPUTS, BASE_CLIENT_ERRORS, **limits
            )
        return handle_batched(
            requests,
            self.generate_jobs,
            self.cache.batchable,
            schema.BASE_INPUTS,
            BASE_CLIENT_ERRORS,
            max_images=self.batch_max_images,
            max_adapters=self.cache.slots.count,
            **limits,
        )


def _device(setting: str, instance_kind: str, device_id: str) -> str:
    """The torch device of the shared base: serving.device, "auto" as Triton placed it."""
    on_gpu = instance_kind.upper() == "GPU"
    if setting == "cpu" or (setting == "auto" and not on_gpu):
        return "cpu"
    return f"cuda:{device_id if on_gpu else 0}"


def error_message(result) -> str | None:
    """A result's error message as it travels (None: images): the caller's mistake starts with
    CLIENT_FAULT_PREFIX (INVALID_ARG, HTTP 400), a condition to retry with RETRY_PREFIX
    (UNAVAILABLE, 503), ours with neither (INTERNAL, 500). Triton 2.51's BLS hands every error
    of the shared base to the user model as INTERNAL, so the prefix carries the code."""
    if not isinstance(result, Exception):
        return None
    if getattr(result, "client_fault", False):
        return bootstrap.CLIENT_FAULT_PREFIX + str(result)
    if getattr(result, "status", 500) == 503:
        return bootstrap.RETRY_PREFIX + str(result)
    return str(result)


class BaseLoading(RequestError):
    """The pipeline is still loading: retry (the user model waits and sends again)."""

    status = 503
    client_fault = False


class LoadingSharedBase:
    """A :class:`SharedBase` made by ``load()`` in a thread: until it is made, every request is
    answered :class:`BaseLoading` (``bootstrap.BASE_LOADING``); a failed load is an internal
    error (the reason in the log) and is tried again RESTART_AFTER_S after the failure."""

    def __init__(self, load: Callable[[], SharedBase], clock=time.monotonic) -> None:
        self._load, self.clock = load, clock
        self.model: SharedBase | None = None
        self.error: InternalError | None = None
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        self.error, self.since = None, self.clock()
        threading.Thread(target=self._run, name="shared-base-load", daemon=True).start()

    def _run(self) -> None:
        try:
            model = self._load()
        except Exception as exc:
            log.error("the shared base could not load its pipeline")
            failed = as_request_error(exc, ())  # logged once, with the reference it answers
            with self._lock:
                self.error, self.since = failed, self.clock()
            return
        with self._lock:
            self.model = model
        log.info("the shared base is ready (%.1f s)", self.clock() - self.since)

    def wait(self, timeout: float | None = None) -> SharedBase | None:
        """The model once loaded (None: still loading after ``timeout``, or failed)."""
        end = None if timeout is None else self.clock() + timeout
        while self.model is None and self.error is None:
            if end is not None and self.clock() >= end:
                break
            time.sleep(0.05)
        return self.model

    def handle(self, requests) -> list:
        if self.model is not None:
            return self.model.handle(requests)
        with self._lock:
            error = self.error
            if error is not None and self.clock() - self.since >= bootstrap.RESTART_AFTER_S:
                self._start()
                error = None
        if error is not None:
            return [error] * len(requests)
        loading = BaseLoading(
            bootstrap.BASE_LOADING.removeprefix(bootstrap.RETRY_PREFIX)
            + f" ({self.clock() - self.since:.0f} s so far); retry"
        )
        return [loading] * len(requests)


__all__ = ["LoadingSharedBase", "RequestError", "SharedBase"]
