"""Generate images through the local MME front: the served user model's schema as KServe JSON.

The request and response follow :mod:`avatarforge.serving.schema` (one declaration of inputs and
outputs): one row, BYTES tensors of shape [1, 1]; an optional input is sent only when given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from ..generate import from_jpeg_base64
from ..serving import schema
from ..serving.client import ServingError, decode_jpegs
from .front import EndpointError, invoke_endpoint


def generate_request(
    prompt: str, negative_prompt: str | None = None, gen_args: str | dict[str, Any] | None = None
) -> dict[str, Any]:
    values = {
        schema.PROMPT.name: prompt,
        schema.NEGATIVE_PROMPT.name: negative_prompt,
        schema.GEN_ARGS.name: schema.gen_args_text(gen_args),
    }
    inputs = [
        {
            "name": spec.name,
            "datatype": spec.wire_type,
            "shape": [1, 1],
            "data": [values[spec.name]],
        }
        for spec in schema.INPUTS
        if values.get(spec.name) is not None
    ]
    outputs = [{"name": spec.name} for spec in schema.OUTPUTS]
    return {"inputs": inputs, "outputs": outputs}


def _output_data(response: dict[str, Any]) -> list:
    name = schema.GENERATED_IMAGE.name
    output = next((o for o in response.get("outputs", []) if o["name"] == name), None)
    if output is None:
        raise ValueError(f"response has no {name!r} output: {sorted(response)}")
    return output["data"]


def images_from_response(response: dict[str, Any]) -> list[Image.Image]:
    return [from_jpeg_base64(text) for text in _output_data(response)]


def jpegs_from_response(response: dict[str, Any]) -> list[bytes]:
    """The JPEG files of a one-row response, exactly as the model encoded them."""
    data = _output_data(response)
    return decode_jpegs(np.array([data], dtype=object))[0]


def generate_jpegs(
    url: str,
    target_model: str,
    prompt: str,
    negative_prompt: str | None = None,
    gen_args: str | dict[str, Any] | None = None,
    *,
    timeout: float = 600.0,
    retry_s: float = 180.0,
    on_retry: Callable[[str, float], None] | None = None,
) -> list[bytes]:
    """JPEG files for one prompt from TargetModel ``target_model`` behind the MME front at
    ``url``, exactly as the model sent them; EndpointError for an error answer or a response
    that holds no JPEGs. A 503 or 429 is sent again for up to ``retry_s``
    (:func:`~avatarforge.mme.front.invoke_endpoint`)."""
    request = generate_request(prompt, negative_prompt, gen_args)
    response = invoke_endpoint(
        url, target_model, request, timeout=timeout, retry_s=retry_s, on_retry=on_retry
    )
    try:
        return jpegs_from_response(response)
    except (ValueError, ServingError) as exc:
        raise EndpointError(200, f"{target_model}: {exc}") from None


def generate(
    url: str,
    target_model: str,
    prompt: str,
    negative_prompt: str | None = None,
    gen_args: str | dict[str, Any] | None = None,
    *,
    timeout: float = 600.0,
    retry_s: float = 180.0,
) -> list[Image.Image]:
    """Images for one prompt from TargetModel ``target_model`` behind the MME front at ``url``."""
    request = generate_request(prompt, negative_prompt, gen_args)
    response = invoke_endpoint(url, target_model, request, timeout=timeout, retry_s=retry_s)
    return images_from_response(response)
