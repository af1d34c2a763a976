"""THE request schema of every served model: one declaration, four readers.

`triton_config` renders config.pbtxt from it, the Triton models parse requests with it (through
:mod:`.handler`), :mod:`.client` builds requests from it and :func:`contract_markdown` writes it
for people (docs/request.md, `avatarforge contract --markdown`), so optional inputs, types, the
batch size and the documentation cannot drift apart (the reference implementation marked inputs
optional and batched 8 while its model read only ``[0][0]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .bootstrap import ADAPTER_INPUT, AUTH_INPUT, DEADLINE_INPUT

MAX_BATCH_SIZE = 8  # rows per Triton request; every row is answered


@dataclass(frozen=True)
class TensorSpec:
    name: str
    help: str
    optional: bool = False
    data_type: str = "TYPE_STRING"  # BYTES on the wire: UTF-8 text or base64
    dims: tuple[int, ...] = (1,)  # per row; Triton adds the batch dimension

    @property
    def wire_type(self) -> str:
        """The datatype name clients use (KServe v2)."""
        return "BYTES" if self.data_type == "TYPE_STRING" else self.data_type.removeprefix("TYPE_")


PROMPT = TensorSpec(
    "prompt", "what to draw; name the person with the user's token: `a photo of <<TOK>> person`"
)
NEGATIVE_PROMPT = TensorSpec("negative_prompt", "what to avoid", optional=True)
GEN_ARGS = TensorSpec(
    "gen_args",
    "JSON object: steps, guidance_scale, seed, height, width, num_images, scheduler",
    optional=True,
)
# Only the shared base model takes this: the calling user model names its adapter folder.
ADAPTER = TensorSpec(ADAPTER_INPUT, "adapter folder of the calling user model", optional=True)
DEADLINE = TensorSpec(
    DEADLINE_INPUT, "unix time after which the user model's client has stopped waiting",
    optional=True,
)  # fmt: skip
# Optional in the config so that a request without it reaches the shared base's one refusal.
AUTH = TensorSpec(
    AUTH_INPUT, "HMAC proving that a user model of this instance sent the request", optional=True
)

INPUTS: tuple[TensorSpec, ...] = (PROMPT, NEGATIVE_PROMPT, GEN_ARGS)
BASE_INPUTS: tuple[TensorSpec, ...] = (*INPUTS, ADAPTER, DEADLINE, AUTH)

GENERATED_IMAGE = TensorSpec(
    "generated_image", "base64 JPEGs: one per image (num_images per row)", dims=(-1,)
)
OUTPUTS: tuple[TensorSpec, ...] = (GENERATED_IMAGE,)


def gen_args_text(gen_args: str | dict[str, Any] | None) -> str | None:
    """``gen_args`` as the GEN_ARGS tensor carries it: JSON text (text is sent as given)."""
    if gen_args is None or isinstance(gen_args, str):
        return gen_args
    return json.dumps(gen_args)


# model_setup: no request data; it answers with what it made sure of.
SETUP_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("check", "ignored; lets a client call model_setup", optional=True),
)
SETUP_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("status", "JSON: shared base path, base hash, environment"),
)


# --------------------------------------------------------------------- the contract, for people

EXAMPLE_URL, EXAMPLE_USER = "127.0.0.1:8000", "alice"  # local-triton's default port

TRITONCLIENT_EXAMPLE = f"""\
import base64
import json
import time

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

URL, USER = "{EXAMPLE_URL}", "{EXAMPLE_USER}"
GEN_ARGS = {{"seed": 1}}  # steps and size left out: the instance's defaults

# The server answers within its request timeout (60 s by default), but a denoising step under
# way is finished first, and one step of a full-size base on a CPU takes a minute: wait longer.
client = httpclient.InferenceServerClient(URL, network_timeout=600.0)


def text_input(name, values):
    \"\"\"A BYTES input of shape [rows, 1]: one UTF-8 string per row.\"\"\"
    data = np.array([[v.encode("utf-8")] for v in values], dtype=object)
    tensor = httpclient.InferInput(name, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


prompts = ["a photo of <<TOK>> person", "an oil painting of <<TOK>> person"]
inputs = [
    text_input("prompt", prompts),
    text_input("negative_prompt", ["blurry"] * len(prompts)),
    text_input("gen_args", [json.dumps(GEN_ARGS)] * len(prompts)),
]
output = httpclient.InferRequestedOutput("generated_image")
for attempt in range(20):
    try:
        result = client.infer(USER, inputs, outputs=[output])
        break
    except InferenceServerException as exc:  # 400: fix the request; 500: see the server's log
        if str(exc.status()) != "503" or attempt == 19:
            raise
        time.sleep(5)  # 503: send it again (e.g. while a fresh server starts the shared base)
for row, images in enumerate(result.as_numpy("generated_image")):  # [rows, num_images]
    for i, jpeg in enumerate(images):
        with open(f"{{USER}}-{{row}}-{{i}}.jpg", "wb") as f:
            f.write(base64.b64decode(jpeg))
"""

# The user in the URL and the file names, and the URL, are EXAMPLE_USER and EXAMPLE_URL.
# --retry sends it again on a 503 (curl writes -o anew for each try; to stdout it would append).
CURL_EXAMPLE = r"""
curl -s --retry 10 --retry-delay 5 -o alice.json http://127.0.0.1:8000/v2/models/alice/infer \
  -H 'Content-Type: application/json' -d '{"inputs": [
    {"name": "prompt", "datatype": "BYTES", "shape": [1, 1],
     "data": ["a photo of <<TOK>> person"]},
    {"name": "gen_args", "datatype": "BYTES", "shape": [1, 1],
     "data": ["{\"seed\": 1}"]}]}'
python3 -c 'import base64, json, sys
r = json.load(open("alice.json"))
if "error" in r: sys.exit(r["error"])
open("alice.jpg", "wb").write(base64.b64decode(r["outputs"][0]["data"][0]))'
""".lstrip("\n")


def _shape(spec: TensorSpec) -> str:
    return str([-1, *spec.dims])  # Triton adds the batch dimension


def _bounds(meta: dict[str, Any]) -> str:
    if meta.get("choices"):
        return ", ".join(f"`{c}`" for c in meta["choices"])
    ge, le = meta.get("ge"), meta.get("le")
    if ge is not None and le is not None:
        return f"{ge} – {le}"
    return f">= {ge}" if ge is not None else (f"<= {le}" if le is not None else "")


def contract_markdown() -> str:
    """The request contract of a user model as Markdown: inputs, output, gen_args fields with
    bounds and aliases, a curl and a tritonclient example (docs/request.md holds this text)."""
    import dataclasses
    import typing

    from ..generate import TINY_CPU_DEFAULTS, GenArgs
    from .config import (  # here: config imports this module
        MAX_REQUEST_COST,
        MAX_RESPONSE_BYTES,
        REQUEST_TIMEOUT_S,
    )
    from .pace import EVIDENCE_CALLS, PACE_MEMORY_S

    rows = [
        f"| `{s.name}` | `{s.wire_type}` | `{_shape(s)}` | {'no' if s.optional else 'yes'} "
        f"| {s.help} |"
        for s in INPUTS
    ]
    outputs = [f"| `{s.name}` | `{s.wire_type}` | `{_shape(s)}` | {s.help} |" for s in OUTPUTS]
    aliases: dict[str, list[str]] = {}
    for alias, name in GenArgs.ALIASES.items():
        aliases.setdefault(name, []).append(f"`{alias}`")
    hints = typing.get_type_hints(GenArgs)
    instance = " (the instance's: see below)"  # serving.default_steps / default_size
    fields = [
        f"| `{f.name}` | {hints[f.name].__name__} | `{f.default!r}`"
        f"{instance if f.name in TINY_CPU_DEFAULTS else ''} | {_bounds(f.metadata)} "
        f"| {', '.join(aliases.get(f.name, []))} | {f.metadata['help']} |"
        for f in dataclasses.fields(GenArgs)
    ]
    tiny = TINY_CPU_DEFAULTS
    elsewhere = ", ".join(f"`{k}`" for k in GenArgs.NOT_HERE)
    return "\n".join(
        [
            "Every user model takes the same request, KServe v2 JSON or through `tritonclient`: "
            "on `local-triton` at `POST /v2/models/<user>/infer`; the same JSON body to the "
            "local MME at `POST /endpoints/local-mme/invocations` with the header "
            "`X-Amzn-SageMaker-Target-Model: <user>.tar.gz`, and to SageMaker with "
            '`invoke_endpoint(EndpointName=..., TargetModel="<user>.tar.gz", '
            'ContentType="application/json", Body=...)`.',
            "",
            "| input | datatype | shape | required | meaning |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "| output | datatype | shape | meaning |",
            "|---|---|---|---|",
            *outputs,
            "",
            f"The first dimension is the batch: 1 to {MAX_BATCH_SIZE} rows per request (a package "
            "may allow fewer: `serving.max_batch_size`), one prompt per row, every row answered "
            "in order; send every input with the same number of rows, shape `[rows, 1]` (a shape "
            "of `[1]` is refused). Text is UTF-8. An omitted optional input takes its defaults; "
            "all rows of one request ask for the same `num_images`. Before any work a request is "
            "held to limits of the instance (`AVATARFORGE_SERVING_<FIELD>`; no package changes "
            "them): its work, rows x num_images x steps x height x width / 512², at most "
            f"{MAX_REQUEST_COST} (`serving.max_request_cost`), and its answer, rows x num_images "
            "base64 JPEGs at up to 1.5 bytes a pixel (what noise takes at quality 95) plus JSON, "
            f"at most {MAX_RESPONSE_BYTES} bytes (`serving.max_response_bytes`: the 6 MB of "
            "SageMaker's InvokeEndpoint response), e.g. two 1024 x 1024 images or eight of "
            "512 x 512, not three of 1024. It is also held to its time, "
            f"`serving.request_timeout_s` ({REQUEST_TIMEOUT_S} s from its arrival): a request "
            "that needs longer even at the fastest pace the shared base reached for work of its "
            f"size or less in the last {PACE_MEMORY_S / 60:.0f} minutes (measured by at least "
            f"{EVIDENCE_CALLS} calls) is refused with the steps that fit and what to change. A "
            "bad row fails its request with HTTP 400 and an error that names the field "
            '(`{"error": "invalid request: gen_args.steps: must be >= 1 (got 0)"}`). What '
            "passes is UNAVAILABLE, `unavailable: ...` (HTTP 503 from tritonserver; through an "
            "MME front, 503 with Retry-After): send the request again a few seconds later. It "
            "is the answer while a fresh instance starts the shared base (a request waits for "
            "it up to 90% of the timeout), when the shared base restarts, and for work not done "
            "within the timeout: it says whether the request waited for its turn (retry) or "
            "ran at a pace that needs more than the timeout (then, what to change). A failure "
            "of the server is a 500 with a reference to its log.",
            "",
            "`gen_args` is a JSON object; every field is optional:",
            "",
            "| field | type | default | allowed | also accepted as | meaning |",
            "|---|---|---|---|---|---|",
            *fields,
            "",
            "A request that leaves out `steps`, `height` or `width` gets the instance's "
            "defaults, `serving.default_steps` and `serving.default_size` "
            "(`AVATARFORGE_SERVING_DEFAULT_STEPS`, `..._DEFAULT_SIZE`), by device and base "
            "where they are 0: the table's on a GPU and for a full-size base; "
            f"{tiny['steps']} steps at {tiny['width']} x {tiny['height']} for the embedded tiny "
            "base on a CPU, which a busy 2-core CPU finishes within the timeout. Send them to "
            "get the same image from every instance.",
            "",
            "An unknown field is refused with the closest known name (`did you mean ...`); "
            f"{elsewhere} do not belong in gen_args (the negative prompt is its own input).",
            "",
            "```bash",
            CURL_EXAMPLE.rstrip("\n"),
            "```",
            "",
            "```python",
            TRITONCLIENT_EXAMPLE.rstrip("\n"),
            "```",
        ]
    )
