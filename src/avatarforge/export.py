"""Adapters in the formats other tools load: the kohya-ss LoRA format (ComfyUI, AUTOMATIC1111).

Our one adapter format is diffusers' (keys ``unet.<module>.lora.down.weight``, alpha in the
safetensors header, see :mod:`avatarforge.adapter`); ComfyUI and AUTOMATIC1111 recognise none
of its keys. The kohya-ss format, which every SD tool loads, names each LoRA pair by its module
path with ``_`` for ``.`` and carries alpha per module:

    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight [r, in]
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight   [out, r]
    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha            scalar
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight ...

For SD 1.x/2.x, kohya's sd-scripts name UNet modules as diffusers does (``down_blocks``, not
the LDM ``input_blocks``; its model spec says ``implementation: diffusers``) and text-encoder
modules as transformers' CLIPTextModel (``text_model.encoder.layers``). ComfyUI maps these
names onto its LDM UNet and OpenCLIP text encoder, AUTOMATIC1111 converts them with its own
regexes, and diffusers' ``load_lora_weights`` reads them back; the weight is
``W + (alpha / rank) * up @ down`` in all of them, as in peft.

The conversion is a pure dict -> dict function (like diffusers' ``lora_conversion_utils``):
tensors are renamed, never recomputed, so the values are bit-identical. Every pair maps or the
conversion fails naming the key: nothing is dropped.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AvatarforgeError

KOHYA = "kohya"
FORMATS = (KOHYA,)

# The pair suffixes an adapter file may hold: diffusers' UNet and text-encoder spellings
# (what our adapters hold) and peft's (what newer diffusers writes).
_SUFFIXES = {
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
}
_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# The text-encoder modules kohya trains and ComfyUI/AUTOMATIC1111 map for SD 2.x (ComfyUI's
# LORA_CLIP_MAP): any other module's LoRA would be ignored by them, so it is refused here.
_TEXT_ENCODER_MODULE = re.compile(
    r"^encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"
)
# peft options that change the weight beyond (alpha / rank) * up @ down: not expressible here.
_UNSUPPORTED_PEFT = ("use_dora", "use_rslora")

# Published SD 2.x ids whose prediction type is known without reading the base.
_KNOWN_PREDICTION = {
    "stabilityai/stable-diffusion-2-1-base": "epsilon",
    "stabilityai/stable-diffusion-2-base": "epsilon",
    "stabilityai/stable-diffusion-2-1": "v_prediction",
    "stabilityai/stable-diffusion-2": "v_prediction",
}


class ExportError(AvatarforgeError, ValueError):
    """An adapter cannot be written in the requested format; the message names the key."""

    status = 400


# ---------------------------------------------------------------- pure conversion


def lora_pairs(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"unet.down_blocks...to_q": {"down": A, "up": B}, ...}`` from a diffusers/peft LoRA
    state dict; raises on a key of no known pair spelling or a pair that lacks a half."""
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in state_dict.items():
        for suffix, half in _SUFFIXES.items():
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                if half in pairs.setdefault(module, {}):
                    raise ExportError(f"{key}: a second {half} matrix for module {module}")
                pairs[module][half] = tensor
                break
        else:
            raise ExportError(
                f"{key}: not a LoRA down/up matrix (expected a key ending in one of "
                f"{', '.join(_SUFFIXES)}); DoRA, biases and embeddings cannot be exported"
            )
    for module, pair in pairs.items():
        if set(pair) != {"down", "up"}:
            missing = ({"down", "up"} - set(pair)).pop()
            raise ExportError(f"{module}: the LoRA {missing} matrix is missing")
    return pairs


def kohya_name(module: str) -> str:
    """The kohya-ss name of a diffusers module path.

    ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0`` ->
    ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0``;
    ``text_encoder.encoder.layers.0.self_attn.q_proj`` (transformers 5) or
    ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj`` (transformers 4) ->
    ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``.
    """
    component, _, path = module.partition(".")
    if component not in _PREFIX or not path:
        raise ExportError(
            f"{module}: an SD 2.x adapter holds modules of 'unet' and 'text_encoder' only"
        )
    if component == "text_encoder":
        path = path.removeprefix("text_model.")  # transformers 5 dropped the wrapper
        if not _TEXT_ENCODER_MODULE.match(path):
            raise ExportError(
                f"{module}: ComfyUI and AUTOMATIC1111 load text-encoder LoRA only on "
                "encoder.layers.N.{self_attn.q_proj,k_proj,v_proj,out_proj,mlp.fc1,mlp.fc2}; "
                "this pair would be ignored there"
            )
        path = "text_model." + path
    return _PREFIX[component] + path.replace(".", "_")


def _check_shapes(module: str, down, up) -> int:
    # kohya/peft layout: down [rank, in(, kh, kw)], up [out, rank(, 1, 1)]
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        raise ExportError(
            f"{module}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a LoRA pair "
            "(expected down [rank, in], up [out, rank])"
        )
    return int(down.shape[0])


def diffusers_to_kohya(
    state_dict: Mapping[str, Any], alphas: Mapping[str, float]
) -> dict[str, Any]:
    """A diffusers/peft LoRA state dict of an SD 2.x pipeline in kohya-ss naming.

    ``alphas``: the LoRA alpha of each component (``{"unet": 2.0, "text_encoder": 4.0}``),
    written per module as ``<name>.alpha`` (float32 scalar), so each tool computes the same
    ``alpha / rank`` scale as peft. Tensors are passed through unchanged (same dtype, same
    values; meta tensors work, for checks without memory).
    """
    import torch

    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for module, pair in sorted(lora_pairs(state_dict).items()):
        name = kohya_name(module)
        if name in origin:  # '.' -> '_' is lossy: refuse rather than overwrite a pair
            raise ExportError(f"{module} and {origin[name]} both map to {name}")
        origin[name] = module
        _check_shapes(module, pair["down"], pair["up"])
        component = module.partition(".")[0]
        if component not in alphas:
            raise ExportError(f"{module}: no LoRA alpha given for component {component!r}")
        out[f"{name}.lora_down.weight"] = pair["down"]
        out[f"{name}.lora_up.weight"] = pair["up"]
        out[f"{name}.alpha"] = torch.tensor(float(alphas[component]), dtype=torch.float32)
    if not out:
        raise ExportError("the adapter holds no LoRA pairs")
    return out


# ---------------------------------------------------------------- the adapter folder -> a file


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_kohya` wrote."""

    path: Path
    unet_pairs: int
    text_encoder_pairs: int
    metadata: dict[str, str]


def _peft_alphas(header: Mapping[str, str], meta) -> dict[str, float]:
    """Each component's alpha from our metadata, checked against the peft config in the
    safetensors header that stock diffusers applies (a disagreement means one was altered)."""
    alphas = {"unet": float(meta.unet_alpha), "text_encoder": float(meta.text_encoder_alpha)}
    config = json.loads(header.get("lora_adapter_metadata", "{}"))
    for component, alpha in alphas.items():
        if f"{component}.lora_alpha" not in config:
            continue  # no peft config for it: diffusers then has nothing else to apply
        for option in _UNSUPPORTED_PEFT:
            if config.get(f"{component}.{option}"):
                raise ExportError(f"{component}: peft option {option} has no kohya equivalent")
        for option in ("alpha_pattern", "rank_pattern"):
            if config.get(f"{component}.{option}"):
                raise ExportError(
                    f"{component}: per-module {option} is not supported by this exporter"
                )
        if float(config[f"{component}.lora_alpha"]) != alpha:
            raise ExportError(
                f"{component}: lora_alpha {float(config[f'{component}.lora_alpha'])} in the "
                f"weights file differs from {alpha} in the adapter metadata"
            )
    return alphas


def prediction_type(base_id: str) -> str | None:
    """'epsilon' or 'v_prediction' for the bases we can tell without loading them, else None."""
    from .base.tiny import TINY_ID_PREFIX
    from .fullsize import FULL_ID_PREFIX

    if base_id.startswith((TINY_ID_PREFIX + "@", FULL_ID_PREFIX + "@")):
        return "epsilon"  # both are built with sd21_scheduler()
    if base_id in _KNOWN_PREDICTION:
        return _KNOWN_PREDICTION[base_id]
    config = Path(base_id) / "scheduler" / "scheduler_config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("prediction_type", "epsilon")
        except (OSError, ValueError):
            return None
    return None


def kohya_metadata(meta, name: str, unet_pairs: int, te_pairs: int) -> dict[str, str]:
    """The safetensors header kohya's sd-scripts writes (the keys tools read), plus ours.

    AUTOMATIC1111 files a LoRA under SD 2 by ``ss_v2 == "True"`` (its Lora tab can hide LoRAs
    of other versions); Forge and other browsers read ``ss_base_model_version`` (``sd_v2``...) or
    ``modelspec.architecture``. ``ss_network_dim``/``ss_network_alpha`` are the UNet's (kohya
    has one value; the per-module ``.alpha`` tensors carry the text encoder's own alpha).
    """
    prediction = prediction_type(meta.base_id)
    v_pred = prediction == "v_prediction"
    data = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(meta.unet_rank),
        "ss_network_alpha": str(float(meta.unet_alpha)),
        "ss_v2": "True",
        "ss_base_model_version": "sd_v2_v" if v_pred else "sd_v2",
        "ss_output_name": name,
        "ss_training_comment": f"avatarforge DreamBooth LoRA; trigger token {meta.token}",
        "ss_max_train_steps": str(meta.steps),
        "ss_seed": str(meta.seed),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.implementation": "diffusers",  # kohya's value for SD 1.x/2.x LoRA
        "modelspec.title": name,
        "modelspec.resolution": f"{meta.resolution}x{meta.resolution}",
        "modelspec.trigger_phrase": meta.token,
        "modelspec.usage_hint": f"prompt '{meta.instance_prompt}'",
        "avatarforge.base_id": meta.base_id,
        "avatarforge.base_hash": meta.base_hash,
        "avatarforge.unet": f"rank {meta.unet_rank}, alpha {meta.unet_alpha}, {unet_pairs} pairs",
        "avatarforge.text_encoder": f"rank {meta.text_encoder_rank}, alpha "
        f"{meta.text_encoder_alpha}, {te_pairs} pairs",
        "avatarforge.weights_sha256": meta.weights_sha256,
    }
    if prediction is not None:
        arch = "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
        data["modelspec.architecture"] = f"{arch}/lora"
        data["modelspec.prediction_type"] = "v" if v_pred else "epsilon"
    return data


def export_kohya(adapter_dir: Path, out: Path, *, name: str | None = None) -> ExportResult:
    """Write the adapter folder ``adapter_dir`` as one kohya-ss LoRA ``.safetensors`` at ``out``
    (atomically, replacing an older file; same adapter -> same bytes).

    ``name``: the title in the file's metadata (default: the file's stem, which is also the name
    AUTOMATIC1111 uses in ``<lora:NAME:1>``).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .adapter import WEIGHTS_FILE, canonicalize_header, read_adapter

    meta = read_adapter(adapter_dir)  # checks the weights' sha256 first
    with safe_open(Path(adapter_dir) / WEIGHTS_FILE, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        header = f.metadata() or {}
    tensors = diffusers_to_kohya(state, _peft_alphas(header, meta))
    names = [k[: -len(".alpha")] for k in tensors if k.endswith(".alpha")]
    unet_pairs = sum(n.startswith(_PREFIX["unet"]) for n in names)
    out = Path(out)
    metadata = kohya_metadata(meta, name or out.stem, unet_pairs, len(names) - unet_pairs)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; this file is meant to be copied
        canonicalize_header(Path(tmp))  # safetensors orders its header differently per run
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return ExportResult(out, unet_pairs, len(names) - unet_pairs, metadata)
