"""Call a served user model over HTTP (tritonclient): prompt in, PIL images out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..generate import from_jpeg_base64
from . import schema


class ServingError(RuntimeError):
    """The server answered with an error for this request (the message is the server's)."""


class ModelNotFoundError(ServingError):
    """No such model is loaded on the server."""


def build_inputs(
    prompts: Sequence[str],
    negative_prompts: Sequence[str | None] | None = None,
    gen_args: Sequence[str | dict[str, Any] | None] | None = None,
):
    """InferInputs with one row per prompt; an optional input is sent only when given."""
    import tritonclient.http as httpclient

    columns = {schema.PROMPT.name: list(prompts)}
    if negative_prompts is not None and any(n is not None for n in negative_prompts):
        columns[schema.NEGATIVE_PROMPT.name] = [n or "" for n in negative_prompts]
    if gen_args is not None and any(g is not None for g in gen_args):
        columns[schema.GEN_ARGS.name] = [schema.gen_args_text(g) or "" for g in gen_args]
    inputs = []
    for spec in schema.INPUTS:
        if spec.name not in columns:
            continue
        data = np.array([[v.encode("utf-8")] for v in columns[spec.name]], dtype=object)
        item = httpclient.InferInput(spec.name, list(data.shape), spec.wire_type)
        item.set_data_from_numpy(data)
        inputs.append(item)
    return inputs


def decode_images(output: np.ndarray) -> list[list[Image.Image]]:
    """generated_image (rows, num_images) -> images per row."""
    return [[from_jpeg_base64(b) for b in row] for row in np.asarray(output, dtype=object)]


def infer(client, model: str, inputs) -> np.ndarray:
    """One request; errors become ServingError / ModelNotFoundError with the server's words."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    try:
        result = client.infer(
            model, inputs, outputs=[httpclient.InferRequestedOutput(schema.GENERATED_IMAGE.name)]
        )
    except InferenceServerException as exc:
        message = exc.message() or str(exc)
        if not _is_ready(client, model):
            raise ModelNotFoundError(
                f"model {model!r} is not loaded on this server ({message}); "
                "package it (avatarforge package --user ...) and load it"
            ) from None
        raise ServingError(f"{model}: {message}") from None
    return result.as_numpy(schema.GENERATED_IMAGE.name)


def _is_ready(client, model: str) -> bool:
    from tritonclient.utils import InferenceServerException

    try:
        return bool(client.is_model_ready(model))
    except InferenceServerException:
        return False


def generate(
    url: str,
    model: str,
    prompt: str,
    negative_prompt: str | None = None,
    gen_args: str | dict[str, Any] | None = None,
    *,
    timeout: float = 600.0,
) -> list[Image.Image]:
    """Images for one prompt from the user model ``model`` at ``url`` (host:port or http://)."""
    import tritonclient.http as httpclient

    url = url.removeprefix("http://")
    client = httpclient.InferenceServerClient(url, network_timeout=timeout)
    try:
        inputs = build_inputs([prompt], [negative_prompt], [gen_args])
        return decode_images(infer(client, model, inputs))[0]
    finally:
        client.close()
