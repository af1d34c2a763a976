"""THE request schema of every served model: one declaration, three readers.

`triton_config` renders config.pbtxt from it, the Triton models parse requests with it (through
:mod:`.handler`) and :mod:`.client` builds requests from it, so optional inputs, types and the
batch size cannot drift apart (the reference implementation marked inputs optional and batched
8 while its model read only ``[0][0]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .bootstrap import ADAPTER_INPUT

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


PROMPT = TensorSpec("prompt", "what to draw; use the user's token, e.g. 'a photo of <<TOK>>'")
NEGATIVE_PROMPT = TensorSpec("negative_prompt", "what to avoid", optional=True)
GEN_ARGS = TensorSpec(
    "gen_args",
    "JSON object: steps, guidance_scale, seed, height, width, num_images, scheduler",
    optional=True,
)
# Only the shared base model takes this: the calling user model names its adapter folder.
ADAPTER = TensorSpec(ADAPTER_INPUT, "adapter folder of the calling user model", optional=True)

INPUTS: tuple[TensorSpec, ...] = (PROMPT, NEGATIVE_PROMPT, GEN_ARGS)
BASE_INPUTS: tuple[TensorSpec, ...] = (*INPUTS, ADAPTER)

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
