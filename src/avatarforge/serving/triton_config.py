"""Render model configs from :mod:`.schema`: a dict (what ``pb_utils.load_model`` takes as
JSON) and its config.pbtxt text (what a repository holds), checked by Triton's own protobuf.

Three models: a user's (packaged; forwards to the shared base), the shared base (started by
the first model that needs it; its config is packaged with every user as a template the
instance completes with its environment path: the same config from every package, so a second
user's load of it changes nothing) and model_setup (local repository only).
"""

from __future__ import annotations

import json
from typing import Any

from ..names import SETUP_MODEL
from . import schema
from .config import SD_BASE_PREFIX, ModelParams, ServingConfig


def _tensors(specs: tuple[schema.TensorSpec, ...], *, inputs: bool) -> list[dict[str, Any]]:
    out = []
    for spec in specs:
        item: dict[str, Any] = {"name": spec.name, "data_type": spec.data_type}
        item["dims"] = list(spec.dims)
        if inputs and spec.optional:
            item["optional"] = True
        out.append(item)
    return out


def _params(values: dict[str, str]) -> dict[str, Any]:
    return {k: {"string_value": str(v)} for k, v in sorted(values.items()) if v != ""}


def _config(name, inputs, outputs, *, max_batch, kind, params, batching) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": name,
        "backend": "python",
        "max_batch_size": max_batch,
        "input": _tensors(inputs, inputs=True),
        "output": _tensors(outputs, inputs=False),
        "instance_group": [{"kind": kind, "count": 1}],
        "parameters": _params(params),
    }
    if batching:
        # requests from many users queue here; execute() answers every one of them
        config["dynamic_batching"] = {"max_queue_delay_microseconds": 0}
    return config


def user_model_config(
    user: str, base_id: str, base_hash: str, serving: ServingConfig | None = None
) -> dict[str, Any]:
    """A user's model: no EXECUTION_ENV_PATH (it runs under the image's bare Python), no
    machine paths; it never needs a GPU itself (it only forwards to the shared base)."""
    serving = serving or ServingConfig()
    params = ModelParams(base_id, base_hash).to_params()
    return _config(
        user, schema.INPUTS, schema.OUTPUTS, max_batch=serving.max_batch_size,
        kind="KIND_CPU", params=params, batching=False,
    )  # fmt: skip


def sd_base_name(base_hash: str) -> str:
    return SD_BASE_PREFIX + base_hash[:12]


def sd_base_config(base_id: str, base_hash: str, *, env_path: str = "") -> dict[str, Any]:
    """The shared base's config; ``env_path`` is the instance's serving environment (empty in
    the template packaged with each user: the instance fills it in). No settings: the shared
    base reads the instance's (:meth:`.ServingConfig.from_env`), and Triton places it
    (KIND_AUTO: on a GPU where the instance has one; ``serving.device`` may keep it on the
    CPU)."""
    params = ModelParams(base_id, base_hash, env_path).to_params()
    return _config(
        sd_base_name(base_hash), schema.BASE_INPUTS, schema.OUTPUTS,
        max_batch=schema.MAX_BATCH_SIZE, kind="KIND_AUTO", params=params, batching=True,
    )  # fmt: skip


def setup_model_config(*, env_path: str = "") -> dict:
    """model_setup's config; without ``env_path`` it is the portable form checked in as
    model_repository/model_setup/config.pbtxt."""
    params = ModelParams(env_path=env_path).to_params()
    return _config(
        SETUP_MODEL, schema.SETUP_INPUTS, schema.SETUP_OUTPUTS, max_batch=0,
        kind="KIND_CPU", params=params, batching=False,
    )  # fmt: skip


SETUP_HEADER = (
    "# Generated from avatarforge.serving.schema by checked_in_setup_config() (a test keeps it\n"
    "# current); `serve local-triton` renders it with this machine's EXECUTION_ENV_PATH.\n"
)


def checked_in_setup_config() -> str:
    """The text of model_repository/model_setup/config.pbtxt."""
    return SETUP_HEADER + to_pbtxt(setup_model_config())


def to_pbtxt(config: dict[str, Any]) -> str:
    """config.pbtxt text, via Triton's ModelConfig protobuf (so an invalid field fails here)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    return text_format.MessageToString(message)


def parse_pbtxt(text: str) -> dict[str, Any]:
    """Parse config.pbtxt the way Triton does; raises ValueError naming the problem."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    try:
        message = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(f"config.pbtxt does not parse: {exc}") from None
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def to_json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)
