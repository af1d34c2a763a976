"""Call a served user model over HTTP (tritonclient): prompt in, JPEGs (as sent) or PIL
images out.

A 503 (Triton error UNAVAILABLE: the model says to send the request again, e.g. while the shared
base restarts) is retried with exponential backoff and jitter for up to ``retry_s``; a 400 (the
request is wrong) or a 500 never is.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..errors import AvatarforgeError
from . import schema


class ServingError(AvatarforgeError, RuntimeError):
    """The server answered with an error for this request (the message is the server's)."""


class ModelNotFoundError(ServingError):
    """No such model is loaded on the server."""

    status = 404


class RetryLaterError(ServingError):
    """The model answered UNAVAILABLE (503): the same request succeeds later."""

    status = 503


def backoff_pause(attempt: int, base_s: float = 0.5, max_s: float = 8.0) -> float:
    """Seconds to wait before retry ``attempt`` (0, 1, ...): exponential, with jitter in
    [ceiling/2, ceiling] (a fleet of clients must not retry in step)."""
    ceiling = min(max_s, base_s * 2**attempt)
    return random.uniform(ceiling / 2, ceiling)


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


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_jpegs(output: np.ndarray) -> list[list[bytes]]:
    """generated_image (rows, num_images) -> the JPEG files per row, exactly as the server
    encoded them (base64-decoded only); ServingError if one is not a JPEG."""
    rows = []
    for r, row in enumerate(np.asarray(output, dtype=object)):
        jpegs = []
        for i, text in enumerate(row):
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise ServingError(f"image {i} of row {r} is not base64") from None
            if not data.startswith(JPEG_MAGIC):
                raise ServingError(f"image {i} of row {r} is not a JPEG")
            jpegs.append(data)
        rows.append(jpegs)
    return rows


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
        if str(exc.status()) == "503":
            raise RetryLaterError(f"{model}: {message}") from None
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


def generate_jpegs(
    url: str,
    model: str,
    prompt: str,
    negative_prompt: str | None = None,
    gen_args: str | dict[str, Any] | None = None,
    *,
    timeout: float = 600.0,
    retry_s: float = 180.0,
    on_retry: Callable[[str, float], None] | None = None,
) -> list[bytes]:
    """JPEG files for one prompt from the user model ``model`` at ``url`` (host:port or
    http://), exactly as the server sent them.

    ``timeout`` is long on purpose: a user's first request starts its model and the shared
    base, which can take longer than tritonclient's default of 60 s. A 503 is sent again for
    up to ``retry_s``; ``on_retry`` hears ``(reason, seconds)`` before each wait."""
    import tritonclient.http as httpclient

    url = url.removeprefix("http://")
    client = httpclient.InferenceServerClient(url, network_timeout=timeout)
    deadline = time.monotonic() + retry_s
    try:
        inputs = build_inputs([prompt], [negative_prompt], [gen_args])
        for attempt in itertools.count():
            try:
                return decode_jpegs(infer(client, model, inputs))[0]
            except RetryLaterError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                pause = min(left, backoff_pause(attempt))
                if on_retry is not None:
                    on_retry(str(exc), pause)
                time.sleep(pause)
        raise AssertionError("unreachable")
    finally:
        client.close()


def generate(
    url: str,
    model: str,
    prompt: str,
    negative_prompt: str | None = None,
    gen_args: str | dict[str, Any] | None = None,
    *,
    timeout: float = 600.0,
    retry_s: float = 180.0,
) -> list[Image.Image]:
    """Images for one prompt from the user model ``model`` at ``url`` (host:port or http://)."""
    jpegs = generate_jpegs(
        url, model, prompt, negative_prompt, gen_args, timeout=timeout, retry_s=retry_s
    )
    return [from_jpeg_bytes(data) for data in jpegs]


def from_jpeg_bytes(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
