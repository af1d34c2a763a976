"""A served user model as one function: the three ways `avatarforge generate` reaches it.

Each returns a :data:`~avatarforge.packs.Generate` — ``(prompt, negative_prompt, gen_args) ->
[JPEG bytes]`` bound to one user's model — calling the same client functions as
`avatarforge generate` (tritonserver, the local MME front, a SageMaker endpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .render import Generate


def triton(url: str, model: str, *, timeout: float = 600.0) -> Generate:
    """The user model ``model`` on tritonserver at ``url`` (host:port)."""
    from ..serving.client import generate_jpegs

    def generate(prompt: str, negative: str | None, gen_args: dict[str, Any]) -> list[bytes]:
        return generate_jpegs(url, model, prompt, negative, gen_args, timeout=timeout)

    return generate


def mme(url: str, target_model: str, *, timeout: float = 600.0) -> Generate:
    """TargetModel ``target_model`` (``<user>.tar.gz``) behind the local MME front at ``url``."""
    from ..mme.generate import generate_jpegs

    def generate(prompt: str, negative: str | None, gen_args: dict[str, Any]) -> list[bytes]:
        return generate_jpegs(url, target_model, prompt, negative, gen_args, timeout=timeout)

    return generate


def endpoint(
    name: str,
    user: str,
    *,
    region: str | None = None,
    models_prefix: str | None = None,
    on_retry: Callable[[str, float], None] | None = None,
) -> Generate:
    """The user's model on the SageMaker multi-model endpoint ``name`` (boto3)."""
    from ..cloud import generate as cloud_generate

    def generate(prompt: str, negative: str | None, gen_args: dict[str, Any]) -> list[bytes]:
        return cloud_generate(
            name,
            user,
            prompt,
            negative,
            gen_args,
            region=region,
            models_prefix=models_prefix,
            on_retry=on_retry,
        )

    return generate
