"""Pure request handling: tensors in, base64 JPEGs or a per-request error out.

No Triton import here: the model.py files hand in each request's input arrays (``None`` for an
omitted optional input) and turn each result into one response or one TritonError. Every
request of a batch is answered, every row of a request is generated; a bad request fails alone,
with a message that names the field, and never as a success-shaped string.

Two ways to run the rows: :func:`handle_requests`, one row at a time, and
:func:`handle_batched`, where rows of different requests (different users) that share a
:func:`~avatarforge.generate.batch_key` are generated together (:func:`plan_batches`).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import AvatarforgeError
from ..generate import GenArgs, batch_key, to_jpeg_base64
from ..settings import ConfigError
from . import schema
from .bootstrap import TIMED_OUT
from .config import MAX_REQUEST_COST, MAX_RESPONSE_BYTES, REQUEST_TIMEOUT_S
from .pace import PROBE_S, Pace, StepShape

log = logging.getLogger(__name__)

# Longest text a request may carry per row. CLIP reads 77 tokens of a prompt; a longer text is
# tokenised whole before that cut, so an unbounded one is work the server does for nothing.
MAX_TEXT_CHARS = {"prompt": 2000, "negative_prompt": 2000, "gen_args": 4096, "adapter": 4096,
                  "deadline": 32, "auth": 64}  # fmt: skip

# The largest JPEG (quality 95, to_jpeg_base64's) of an image of N pixels is at most
# JPEG_BYTES_PER_PIXEL * N + JPEG_HEADER_BYTES. Measured on what compresses worst, noise (each
# channel 0 or 255 at random, uniform noise, clipped Gaussian, a random search over 8x8
# blocks): 1.432 bytes a pixel at 256 px and up, 1.57 at 64x64 (6,420 bytes, headers
# included); test_serving checks the bound on noise at the smallest, largest and oddest sizes.
JPEG_BYTES_PER_PIXEL = 1.5
JPEG_HEADER_BYTES = 1024
# KServe v2 JSON around the images (model name, output name, datatype, shape), and around
# each image: its quotes and comma
RESPONSE_ENVELOPE_BYTES = 1024
PER_IMAGE_JSON_BYTES = 3


class RequestError(AvatarforgeError, ValueError):
    """This request cannot be answered; the message is what the client sees.

    ``client_fault``: the caller's mistake (a bad input, an adapter it cannot have) — Triton
    answers it as INVALID_ARG (HTTP 400); otherwise ours (INTERNAL, HTTP 500).
    """

    status = 400
    client_fault = True


class InternalError(RequestError):
    """Our failure: the client is told that, with a reference to the log line holding the
    detail (exception text and server paths stay in the log)."""

    status = 500
    client_fault = False


class DeadlineExceeded(RequestError):
    """Not done within the instance's request timeout: skipped before its turn, or stopped
    between two denoising steps once it could no longer end in time. HTTP 503: retry. The
    message says which, and why: the time it waited for its turn (the server was busy), or a
    pace at which the request needs more than the whole timeout (then what to change)."""

    status = 503
    client_fault = False

    def __init__(self, what: str, advice: str = "retry", timeout_s: float = REQUEST_TIMEOUT_S):
        super().__init__(f"{TIMED_OUT} ({timeout_s:.0f} s) of its arrival: {what}; {advice}")


def too_long_advice(timeout_s: float, steps: int | None = None) -> str:
    """What to change for a request that needs more than ``timeout_s`` (``steps``: how many
    fit at this size; None: not known)."""
    if steps is None:
        fewer = "fewer steps, smaller or fewer images"
    elif steps == 0:
        fewer = "smaller or fewer images (not one step of this size fits)"
    else:
        plural = "s" if steps > 1 else ""
        fewer = f"at most {steps} step{plural} at this size, smaller or fewer images"
    return (
        f"more than the instance's serving.request_timeout_s of {timeout_s:.0f} s: ask for "
        f"{fewer}, or raise AVATARFORGE_SERVING_REQUEST_TIMEOUT_S on the instance"
    )


def waited_words(waited_s: float) -> str:
    return (
        f"its turn came {waited_s:.0f} s after its arrival (the server was busy with other "
        "requests, or its shared base was starting)"
    )


@dataclass(frozen=True)
class Row:
    prompt: str
    negative_prompt: str | None
    args: GenArgs


@dataclass(frozen=True)
class ParsedRequest:
    rows: list[Row]
    adapter: str | None  # adapter folder (shared base only); None: the base alone
    deadline: float | None = None  # unix time; past it nobody waits for the answer


def past(deadline: float | None) -> bool:
    """Whether nobody waits any more for work with this deadline (None: someone always does)."""
    return deadline is not None and time.time() > deadline


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


def request_cost(rows: Sequence[Row]) -> float:
    """The work a request asks for, in 512x512 denoising steps (what its time grows with)."""
    return sum(r.args.num_images * r.args.steps * r.args.height * r.args.width for r in rows) / (
        512 * 512
    )


def response_bytes(rows: Sequence[Row]) -> int:
    """The most bytes the answer to these rows can take as KServe v2 JSON: every image a base64
    JPEG as large as noise makes it (JPEG_BYTES_PER_PIXEL)."""
    total = RESPONSE_ENVELOPE_BYTES
    for r in rows:
        jpeg = math.ceil(JPEG_BYTES_PER_PIXEL * r.args.height * r.args.width) + JPEG_HEADER_BYTES
        total += r.args.num_images * (4 * math.ceil(jpeg / 3) + PER_IMAGE_JSON_BYTES)
    return total


def parse_request(
    inputs: Mapping[str, np.ndarray | None],
    specs: Sequence[schema.TensorSpec] = schema.BASE_INPUTS,
    *,
    max_cost: float = MAX_REQUEST_COST,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
    defaults: GenArgs | None = None,
) -> ParsedRequest:
    """Validate one request's inputs; raises RequestError naming the field. A gen_args field
    left out takes ``defaults``' value (the instance's: :func:`~avatarforge.generate.
    serving_defaults`; None: GenArgs' own). Refused before any work: a request whose
    :func:`request_cost` is over ``max_cost`` (one in-bounds request, 8 rows x 8 images x
    1024 px x 150 steps, would hold the shared base for many minutes), and one whose answer
    could be larger than ``max_response_bytes`` (:func:`response_bytes`: SageMaker's
    InvokeEndpoint drops a response Body over 6 MB)."""
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
        limit = MAX_TEXT_CHARS.get(spec.name)
        if limit and any(len(t) > limit for t in texts[spec.name]):
            raise RequestError(f"{spec.name}: longer than {limit} characters")
        if len(texts[spec.name]) != n:
            raise RequestError(f"{spec.name}: expected one value per row")
    if not rows:  # a [0, 1] tensor: nothing to answer (and no empty output to encode)
        raise RequestError(f"{schema.PROMPT.name}: a request needs at least one row")
    negative = texts.get(schema.NEGATIVE_PROMPT.name)
    gen_args = texts.get(schema.GEN_ARGS.name)
    parsed = []
    for i in range(rows):
        try:
            args = GenArgs.parse(gen_args[i] if gen_args else None, defaults)
        except ConfigError as exc:
            raise RequestError(str(exc)) from None
        prompt = texts[schema.PROMPT.name][i]  # type: ignore[index]
        if not prompt.strip():
            raise RequestError("prompt: must not be empty")
        parsed.append(Row(prompt, (negative[i] or None) if negative else None, args))
    if (cost := request_cost(parsed)) > max_cost:
        raise RequestError(
            f"request: asks for {cost:.0f} 512x512 denoising steps (rows x num_images x steps x "
            f"height x width / 512^2), over this server's {max_cost:.0f} "
            "(serving.max_request_cost): send fewer rows, images or steps, or smaller images"
        )
    if (size := response_bytes(parsed)) > max_response_bytes:
        raise RequestError(
            f"request: its images could take up to {size} bytes as base64 JPEGs (rows x "
            "num_images x height x width at 1.5 bytes a pixel, base64), over the "
            f"{max_response_bytes}-byte limit of an answer (serving.max_response_bytes: "
            "SageMaker's 6 MB): ask for fewer or smaller images"
        )
    if len({r.args.num_images for r in parsed}) > 1:
        raise RequestError("gen_args.num_images: must be the same for every row of one request")
    adapters = set(texts.get(schema.ADAPTER.name) or [""])
    if len(adapters) != 1:
        raise RequestError("adapter: one request serves one adapter")
    return ParsedRequest(parsed, adapters.pop() or None, _deadline(texts.get(schema.DEADLINE.name)))


def _deadline(texts: list[str] | None) -> float | None:
    if not texts:
        return None
    try:
        values = {float(t) for t in texts}
    except ValueError:
        raise RequestError("deadline: not a number") from None
    if len(values) != 1 or not all(math.isfinite(v) for v in values):
        raise RequestError("deadline: one finite time per request")
    return values.pop()


@dataclass(frozen=True)
class TimeBudget:
    """The time each request has from its arrival at its user model (the instance's
    ``serving.request_timeout_s``; its deadline is that arrival plus this), and the pace of the
    shared base it is judged by (:class:`~.pace.Pace`)."""

    timeout_s: float
    pace: Pace

    def refuse_if_too_long(self, calls: Sequence[tuple[StepShape, int]]) -> None:
        """RequestError (400) for pipeline calls (shape, steps) that need more than the whole
        timeout even at the fastest pace measured for work of their size: sent again, they
        would only fail again (:mod:`.pace` says which measurements count: enough calls, one
        of them in the last PROBE_S)."""
        need = self.pace.least_seconds(calls, PROBE_S)
        if need <= self.timeout_s:
            return
        step_s = max(self.pace.step_s(shape, PROBE_S) or 0.0 for shape, _ in calls)
        fits = int(self.timeout_s / step_s) if len(calls) == 1 and step_s else None
        minutes = self.pace.memory_s / 60
        raise RequestError(
            f"request: needs at least {need:.0f} s of denoising at {step_s:.2f} s a step (the "
            f"fastest step this server made in the last {minutes:.0f} minutes for work of its "
            f"size or less), {too_long_advice(self.timeout_s, fits)}"
        )

    def skip(self, deadline: float | None, calls: Sequence[tuple[StepShape, int]]):
        """The DeadlineExceeded to answer, instead of running, work with ``deadline`` that
        cannot end by then at the fastest pace measured; None: run it."""
        if deadline is None:
            return None
        now = time.time()
        waited = now - (deadline - self.timeout_s)
        if now > deadline:
            return DeadlineExceeded(
                f"skipped: {waited_words(waited)}", "retry", timeout_s=self.timeout_s
            )
        need = self.pace.least_seconds(calls)
        if now + need <= deadline:
            return None
        return DeadlineExceeded(
            f"skipped: {waited_words(waited)}, and it needs at least {need:.0f} s at the "
            f"fastest pace measured here, {deadline - now:.0f} s were left",
            "retry",
            timeout_s=self.timeout_s,
        )


# a TimeBudget's pace that knows nothing: only deadlines that passed skip work
NO_PACE = TimeBudget(REQUEST_TIMEOUT_S, Pace())


def row_calls(rows: Sequence[Row]) -> list[tuple[StepShape, int]]:
    """Each row as a pipeline call of its own: (shape, steps)."""
    return [(StepShape.of([r.args]), r.args.steps) for r in rows]


def answer(parsed: ParsedRequest, generate: Generate) -> np.ndarray:
    """generated_image for every row: shape (rows, num_images), base64 JPEG bytes."""
    return encode_rows(
        [generate(r.prompt, r.negative_prompt, r.args, parsed.adapter) for r in parsed.rows]
    )


def encode_rows(rows: Sequence[Sequence]) -> np.ndarray:
    """Images per row -> the output array: shape (rows, num_images), base64 JPEG bytes."""
    out = [[to_jpeg_base64(im).encode("ascii") for im in images] for images in rows]
    return np.array(out, dtype=object).reshape(len(out), -1)


# Errors a client caused or can act on: their message goes back as is.
CLIENT_ERRORS: tuple[type[Exception], ...] = (RequestError, ConfigError)


def handle_requests(
    requests: Sequence[Mapping[str, np.ndarray | None]],
    generate: Generate,
    specs: Sequence[schema.TensorSpec] = schema.BASE_INPUTS,
    client_errors: tuple[type[Exception], ...] = CLIENT_ERRORS,
    *,
    max_cost: float = MAX_REQUEST_COST,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
    defaults: GenArgs | None = None,
    budget: TimeBudget = NO_PACE,
) -> list[np.ndarray | RequestError]:
    """One result per request, in order: the output array or the RequestError to send. A
    request that cannot end within ``budget``'s timeout is refused, one that cannot end by its
    deadline skipped (:class:`TimeBudget`)."""
    limits = {"max_cost": max_cost, "max_response_bytes": max_response_bytes, "defaults": defaults}
    results: list[np.ndarray | RequestError] = []
    for inputs in requests:
        try:
            parsed = parse_request(inputs, specs, **limits)
            calls = row_calls(parsed.rows)
            budget.refuse_if_too_long(calls)
            if (skipped := budget.skip(parsed.deadline, calls)) is not None:
                raise skipped
            results.append(answer(parsed, generate))
        except Exception as exc:  # one broken request must not take the batch down with it
            results.append(as_request_error(exc, client_errors))
    return results


def as_request_error(exc: Exception, client_errors: tuple[type[Exception], ...]) -> RequestError:
    """What the client is told: its own error as is, anything else as an internal error."""
    if isinstance(exc, client_errors):
        return exc if isinstance(exc, RequestError) else RequestError(str(exc))
    reference = uuid.uuid4().hex[:12]
    log.error("request failed (reference %s)", reference, exc_info=exc)
    return InternalError(f"internal error (reference {reference} in the server's log)")


# ---------------------------------------------------------------- rows of many requests at once


@dataclass(frozen=True)
class Job:
    """One row of one request of the batch Triton handed in."""

    request: int  # index of the request in the batch
    index: int  # index of the row in its request
    row: Row
    adapter: str | None
    deadline: float | None = None  # the request's (see ParsedRequest)


# jobs (sharing one batch_key, or one job) -> each job's images, in order
RunJobs = Callable[[list[Job]], list[list]]
# adapter folder (or None) -> whether its rows may share a pipeline call with other adapters';
# raises (a client error for a broken adapter) when it cannot be served at all
Batchable = Callable[[str | None], bool]


def plan_batches(jobs: Sequence[Job], max_images: int, max_adapters: int) -> list[list[Job]]:
    """Jobs grouped by :func:`batch_key` (first seen, first run), each group cut into pipeline
    calls of at most ``max_images`` images and ``max_adapters`` distinct adapters; a job whose
    key is None runs alone."""
    groups: dict[tuple, list[Job]] = {}
    calls: list[list[Job]] = []
    for job in jobs:
        key = batch_key(job.row.args)
        if key is None:
            calls.append([job])
        else:
            groups.setdefault(key, []).append(job)
    for group in groups.values():
        call: list[Job] = []
        images, adapters = 0, set()
        for job in group:
            n = job.row.args.num_images
            more = adapters | ({job.adapter} - {None})
            if call and (images + n > max_images or len(more) > max_adapters):
                calls.append(call)
                call, images, more = [], 0, {job.adapter} - {None}
            call.append(job)
            images, adapters = images + n, more
        calls.append(call)
    return calls


def handle_batched(
    requests: Sequence[Mapping[str, np.ndarray | None]],
    run: RunJobs,
    batchable: Batchable,
    specs: Sequence[schema.TensorSpec] = schema.BASE_INPUTS,
    client_errors: tuple[type[Exception], ...] = CLIENT_ERRORS,
    *,
    max_images: int = 8,
    max_adapters: int = 8,
    max_cost: float = MAX_REQUEST_COST,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
    defaults: GenArgs | None = None,
    budget: TimeBudget = NO_PACE,
) -> list[np.ndarray | RequestError]:
    """As :func:`handle_requests`, with the rows of all requests run in as few pipeline calls as
    their settings allow. Each adapter is prepared once, before anything runs, so a broken one
    fails its requests alone; a call that fails is retried row by row, so that only the
    requests whose rows fail alone get the error. ``run`` stops a call itself once nobody
    waits for it (its jobs' deadlines)."""
    limits = {"max_cost": max_cost, "max_response_bytes": max_response_bytes, "defaults": defaults}
    errors: dict[int, RequestError] = {}
    parsed: dict[int, ParsedRequest] = {}
    for i, inputs in enumerate(requests):
        try:
            request = parse_request(inputs, specs, **limits)
            # its own calls, as if alone: the least it needs, however it is batched
            alone = [Job(0, k, row, request.adapter) for k, row in enumerate(request.rows)]
            budget.refuse_if_too_long(
                [(StepShape.of([j.row.args for j in call]), call[0].row.args.steps)
                 for call in plan_batches(alone, max_images, max_adapters)]
            )  # fmt: skip
            parsed[i] = request
        except Exception as exc:
            errors[i] = as_request_error(exc, client_errors)
    together: dict[str | None, bool] = {}
    for request in parsed.values():
        if request.adapter in together:
            continue
        try:
            together[request.adapter] = batchable(request.adapter)
        except Exception as exc:
            error = as_request_error(exc, client_errors)
            for j, other in parsed.items():
                if other.adapter == request.adapter:
                    errors[j] = error
    batched, alone = [], []
    for i, request in parsed.items():
        if i in errors:
            continue
        for k, row in enumerate(request.rows):
            job = Job(i, k, row, request.adapter, request.deadline)
            (batched if together[request.adapter] else alone).append(job)
    calls = plan_batches(batched, max_images, max_adapters) + [[job] for job in alone]
    images: dict[tuple[int, int], list] = {}

    def attempt(call: list[Job]) -> Exception | None:
        try:
            out = run(call)
            for job, row_images in zip(call, out, strict=True):
                images[job.request, job.index] = row_images
        except DeadlineExceeded as exc:  # every client of the call has gone: no retry
            for job in call:
                errors.setdefault(job.request, exc)
            return None
        except Exception as exc:
            if len(call) == 1:
                errors.setdefault(call[0].request, as_request_error(exc, client_errors))
            return exc
        return None

    for call in calls:
        for job in call:
            # nobody waits for it, or it cannot end while they do: skip
            skipped = budget.skip(job.deadline, row_calls([job.row]))
            if skipped is not None:
                errors.setdefault(job.request, skipped)
        call = [job for job in call if job.request not in errors]  # a failed request stops
        if call and (exc := attempt(call)) is not None and len(call) > 1:
            log.warning("a batch of %d rows failed (%r); one at a time now", len(call), exc)
            for job in call:
                if job.request not in errors:
                    attempt([job])
    results: list[np.ndarray | RequestError] = []
    for i in range(len(requests)):
        if i not in errors:
            try:
                results.append(encode_rows([images[i, k] for k in range(len(parsed[i].rows))]))
                continue
            except Exception as exc:
                errors[i] = as_request_error(exc, client_errors)
        results.append(errors[i])
    return results
