"""Render model configs from :mod:`.schema`: a dict (what ``pb_utils.load_model`` takes as
JSON) and its config.pbtxt text (what a repository holds), checked by Triton's own protobuf."""

from __future__ import annotations

import json
from typing import Any

from . import schema
from .config import (
    ADAPTER_CACHE_SIZE,
    ADAPTER_SUBDIR,
    P_ADAPTER_DIR,
    P_BASE_HASH,
    P_BASE_ID,
    P_BASE_PATH,
    P_BASE_SOURCE,
    P_CACHE_SIZE,
    P_DEVICE,
    P_ENV_PATH,
    P_ENV_SOURCE,
    P_SHARED_DIR,
    SD_BASE_PREFIX,
    ServingConfig,
)

SETUP_MODEL = "model_setup"


def instance_kind(device: str = "auto") -> str:
    if device == "auto":
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:  # a client-only install: no torch, no GPU use
            device = "cpu"
    return "KIND_GPU" if device == "cuda" else "KIND_CPU"


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


def _shared_files_params(serving: ServingConfig) -> dict[str, str]:
    # Any model may be the first to start on an instance, so each one carries what it needs to
    # fetch the shared files and to load the shared base (runtime.plan_shared_base reads them).
    return {
        P_SHARED_DIR: serving.shared_dir,
        P_BASE_SOURCE: serving.base_source,
        P_ENV_SOURCE: serving.env_source,
        P_CACHE_SIZE: str(serving.adapter_cache_size),
        P_DEVICE: serving.device,
    }


def user_model_config(
    user: str, base_id: str, base_hash: str, serving: ServingConfig | None = None
) -> dict[str, Any]:
    serving = serving or ServingConfig()
    params = {
        P_ENV_PATH: serving.resolved_env_path(),
        P_BASE_ID: base_id,
        P_BASE_HASH: base_hash,
        P_ADAPTER_DIR: ADAPTER_SUBDIR,
        **_shared_files_params(serving),
    }
    # The user model only forwards to the shared base: it never needs a GPU itself.
    return _config(
        user, schema.INPUTS, schema.OUTPUTS, max_batch=serving.max_batch_size,
        kind="KIND_CPU", params=params, batching=False,
    )  # fmt: skip


def setup_model_config(
    serving: ServingConfig | None = None, *, portable: bool = False
) -> dict[str, Any]:
    """model_setup's config; ``portable``: without this machine's EXECUTION_ENV_PATH (the form
    checked in as model_repository/model_setup/config.pbtxt)."""
    serving = serving or ServingConfig()
    params = {
        P_ENV_PATH: "" if portable else serving.resolved_env_path(),
        **_shared_files_params(serving),
    }
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
    return SETUP_HEADER + to_pbtxt(setup_model_config(portable=True))


def sd_base_name(base_hash: str) -> str:
    return SD_BASE_PREFIX + base_hash[:12]


def sd_base_config(
    base_id: str, base_hash: str, base_path: str, env_path: str, *,
    cache_size: int = ADAPTER_CACHE_SIZE, max_batch_size: int = schema.MAX_BATCH_SIZE,
    device: str = "auto",
) -> dict[str, Any]:  # fmt: skip
    params = {
        P_ENV_PATH: env_path,
        P_BASE_ID: base_id,
        P_BASE_HASH: base_hash,
        P_BASE_PATH: base_path,
        P_CACHE_SIZE: str(cache_size),
    }
    return _config(
        sd_base_name(base_hash), schema.BASE_INPUTS, schema.OUTPUTS,
        max_batch=max_batch_size, kind=instance_kind(device), params=params, batching=True,
    )  # fmt: skip


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
