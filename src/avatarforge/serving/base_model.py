"""The shared base model: one pipeline of the base, user adapters switched in per request."""

from __future__ import annotations

from pathlib import Path

from ..adapter import AdapterError
from ..base import BaseError, load_pipeline, read_base_info
from ..generate import GenArgs, generate_images
from . import schema
from .adapter_cache import AdapterCache
from .config import ADAPTER_CACHE_SIZE, P_BASE_HASH, P_BASE_ID, P_BASE_PATH, P_CACHE_SIZE
from .handler import CLIENT_ERRORS, RequestError, handle_requests

# An adapter that is missing, broken or trained on another base is the caller's problem.
BASE_CLIENT_ERRORS = (*CLIENT_ERRORS, AdapterError, BaseError)


class SharedBase:
    def __init__(self, pipe, base, cache_size: int = ADAPTER_CACHE_SIZE) -> None:
        self.pipe, self.base = pipe, base
        self.cache = AdapterCache(pipe, base, cache_size)

    @classmethod
    def from_params(cls, params: dict[str, str], instance_kind: str, device_id: str = "0"):
        """From the config parameters plan_shared_base wrote (Triton's instance kind decides)."""
        base = read_base_info(Path(params[P_BASE_PATH]), params.get(P_BASE_ID) or None)
        if params.get(P_BASE_HASH) and base.content_hash != params[P_BASE_HASH]:
            raise BaseError(f"{base.path} changed: hash {base.content_hash[:12]} is not expected")
        device = f"cuda:{device_id}" if instance_kind.upper() == "GPU" else "cpu"
        cache_size = int(params.get(P_CACHE_SIZE) or ADAPTER_CACHE_SIZE)
        return cls(load_pipeline(base, device), base, cache_size)

    def generate(self, prompt: str, negative: str | None, args: GenArgs, adapter: str | None):
        self.cache.activate(adapter)
        return generate_images(self.pipe, prompt, negative, args)

    def handle(self, requests) -> list:
        return handle_requests(requests, self.generate, schema.BASE_INPUTS, BASE_CLIENT_ERRORS)


__all__ = ["RequestError", "SharedBase"]
