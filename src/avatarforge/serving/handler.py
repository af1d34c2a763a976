"""Pure request handling: tensors in, base64 JPEGs or a per-request error out.

No Triton import here: the model.py files hand in each request's input arrays (``None`` for an
omitted optional input) and turn each result into one response or one TritonError. Every
request of a batch is answered, every row of a request is generated; a bad request fails alone,
with a message that names the field, and never as a success-shaped string.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..generate import GenArgs, to_jpeg_base64
from ..settings import ConfigError
from . import schema

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """This request cannot be answered; the message is what the client sees."""


@dataclass(frozen=True)
class Row:
    prompt: str
    negative_prompt: str | None
    args: GenArgs


@dataclass(frozen=True)
class ParsedRequest:
    rows: list[Row]
    adapter: str | None  # adapter folder (shared base only); None: the base alone


# (prompt, negative_prompt, args, adapter) -> images
Generate = Callable[[str, str | None, GenArgs, str | None], list]


def _texts(name: str, value: np.ndarray) -> list[str]:
    flat = np.asarray(value, dtype=object).reshape(-1) if np.ndim(value) else [value]
    out = []
    for item in flat:
        try:
            out.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
        except UnicodeDecodeError:
            raise RequestError(f"{name}: not UTF-8 text") from None
    return out


def _rows_of(value: np.ndarray) -> int:
    return int(np.shape(value)[0]) if np.ndim(value) else 1


def parse_request(
    inputs: Mapping[str, np.ndarray | None], specs: Sequence[schema.TensorSpec] = schema.BASE_INPUTS
) -> ParsedRequest:
    """Validate one request's inputs; raises RequestError naming the field."""
    texts: dict[str, list[str] | None] = {}
    rows = None
    for spec in specs:
        value = inputs.get(spec.name)
        if value is None:
            if not spec.optional:
                raise RequestError(f"{spec.name}: required input is missing")
            texts[spec.name] = None
            continue
        n = _rows_of(value)
        if rows is not None and n != rows:
            raise RequestError(f"{spec.name}: has {n} rows, other inputs have {rows}")
        rows = n
        texts[spec.name] = _texts(spec.name, value)
        if len(texts[spec.name]) != n:
            raise RequestError(f"{spec.name}: expected one value per row")
    rows = rows or 0
    negative = texts.get(schema.NEGATIVE_PROMPT.name)
    gen_args = texts.get(schema.GEN_ARGS.name)
    parsed = []
    for i in range(rows):
        try:
            args = GenArgs.parse(gen_args[i] if gen_args else None)
        except ConfigError as exc:
            raise RequestError(str(exc)) from None
        prompt = texts[schema.PROMPT.name][i]  # type: ignore[index]
        if not prompt.strip():
            raise RequestError("prompt: must not be empty")
        parsed.append(Row(prompt, (negative[i] or None) if negative else None, args))
    if len({r.args.num_images for r in parsed}) > 1:
        raise RequestError("gen_args.num_images: must be the same for every row of one request")
    adapters = set(texts.get(schema.ADAPTER.name) or [""])
    if len(adapters) != 1:
        raise RequestError("adapter: one request serves one adapter")
    return ParsedRequest(parsed, adapters.pop() or None)


def answer(parsed: ParsedRequest, generate: Generate) -> np.ndarray:
    """generated_image for every row: shape (rows, num_images), base64 JPEG bytes."""
    out = []
    for row in parsed.rows:
        images = generate(row.prompt, row.negative_prompt, row.args, parsed.adapter)
        out.append([to_jpeg_base64(im).encode("ascii") for im in images])
    return np.array(out, dtype=object).reshape(len(out), -1)


# Errors a client caused or can act on: their message goes back as is.
CLIENT_ERRORS: tuple[type[Exception], ...] = (RequestError, ConfigError)


def handle_requests(
    requests: Sequence[Mapping[str, np.ndarray | None]],
    generate: Generate,
    specs: Sequence[schema.TensorSpec] = schema.BASE_INPUTS,
    client_errors: tuple[type[Exception], ...] = CLIENT_ERRORS,
) -> list[np.ndarray | RequestError]:
    """One result per request, in order: the output array or the RequestError to send."""
    results: list[np.ndarray | RequestError] = []
    for inputs in requests:
        try:
            results.append(answer(parse_request(inputs, specs), generate))
        except client_errors as exc:
            results.append(exc if isinstance(exc, RequestError) else RequestError(str(exc)))
        except Exception as exc:  # one broken request must not take the batch down with it
            log.exception("request failed")
            results.append(RequestError(f"internal error: {type(exc).__name__}: {exc}"))
    return results
