"""The shared base: one pipeline of the base, user adapters switched in per request (what the
shared base's Triton model, ``triton_models/shared_base.py``, runs; starting that model is
:class:`.bootstrap.SharedBaseModel`'s).

Adapters are activated by a copy into preallocated LoRA slots (:class:`SlotAdapterCache`);
with ``batching`` on, the rows of a Triton batch that share size, steps, scheduler, guidance and
num_images run as one pipeline call with a LoRA per row (:func:`handler.handle_batched`), and a
row alone runs exactly as ``generate_images`` with its adapter loaded. Off: one row at a time.
"""

from __future__ import annotations

from ..adapter import AdapterError
from ..base.identity import BaseError
from ..generate import GenArgs, GenerationStopped, generate_batch, generate_images
from . import bootstrap, schema
from .adapter_cache import SlotAdapterCache
from .config import (
    ADAPTER_CACHE_MIB,
    ADAPTER_CACHE_SIZE,
    BATCH_MAX_IMAGES,
    MAX_REQUEST_COST,
    ModelParams,
    ServingConfig,
)
from .handler import (
    CLIENT_ERRORS,
    DeadlineExceeded,
    Job,
    RequestError,
    handle_batched,
    handle_requests,
    past,
)

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
    ) -> None:
        self.pipe, self.base = pipe, base
        self.compile_seconds = 0.0  # the UNet's compile at start (from_params)
        self.max_request_cost = max_request_cost
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
        cls, params: ModelParams, instance_kind: str, device_id: str = "0", environ=None
    ):
        """From its config parameters and the instance's environment: the base is fetched from
        AVATARFORGE_BASE_SOURCE into the shared dir if not there yet, and must have the hash
        the config names (Triton's instance kind decides the device)."""
        from ..base.pipeline import INDUCTOR_CACHE, load_pipeline, prepare_for_serving
        from .shared_files import ensure_base

        instance = bootstrap.Instance(environ)
        base = ensure_base(
            instance.base_source,
            instance.shared_dir,
            expected_hash=params.base_hash,
            base_id=params.base_id,
            verify=True,  # once per start of the shared base: every byte it will serve
        )
        device = f"cuda:{device_id}" if instance_kind.upper() == "GPU" else "cpu"
        serving = params.serving or ServingConfig()
        shared = cls(
            load_pipeline(base, device),
            base,
            serving.adapter_cache_size,
            cache_mib=serving.adapter_cache_mib,
            batching=serving.batching,
            batch_max_images=serving.batch_max_images,
            max_request_cost=serving.max_request_cost,
        )
        # compiled once the LoRA slots hook into the UNet (later hooks would not be traced),
        # warmed up with the bare base's plan (the graph of every user); the kernels cached
        # in the shared dir, so a restart or a second instance reuses them
        shared.compile_seconds = prepare_for_serving(
            shared.pipe,
            serving.torch_compile,
            instance.shared_dir / INDUCTOR_CACHE,
            before_warm_up=lambda: shared.cache.activate(None),
        )
        return shared

    def generate(self, prompt: str, negative: str | None, args: GenArgs, adapter: str | None):
        self.cache.activate(adapter)
        return generate_images(self.pipe, prompt, negative, args)

    def generate_jobs(self, jobs: list[Job]) -> list[list]:
        """Rows sharing a batch key as one pipeline call (one row: exactly `generate`). It
        stops between two steps when every client of the call has stopped waiting."""
        deadlines = [job.deadline for job in jobs]
        stop = None
        if None not in deadlines:
            last = max(deadlines)
            stop = lambda: past(last)  # noqa: E731
        try:
            if len(jobs) == 1:
                (job,) = jobs
                self.cache.activate(job.adapter)
                row = job.row
                return [generate_images(self.pipe, row.prompt, row.negative_prompt, row.args,
                                        stop=stop)]  # fmt: skip
            rows = [(job.row.prompt, job.row.negative_prompt, job.row.args) for job in jobs]
            with self.cache.rows([job.adapter for job in jobs], jobs[0].row.args.num_images):
                return generate_batch(self.pipe, rows, stop=stop)
        except GenerationStopped as exc:
            raise DeadlineExceeded(str(exc)) from None

    def handle(self, requests) -> list:
        if not self.batching:
            return handle_requests(
                requests,
                self.generate,
                schema.BASE_INPUTS,
                BASE_CLIENT_ERRORS,
                max_cost=self.max_request_cost,
            )
        return handle_batched(
            requests,
            self.generate_jobs,
            self.cache.batchable,
            schema.BASE_INPUTS,
            BASE_CLIENT_ERRORS,
            max_images=self.batch_max_images,
            max_adapters=self.cache.slots.count,
            max_cost=self.max_request_cost,
        )


__all__ = ["RequestError", "SharedBase"]
