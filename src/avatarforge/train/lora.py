"""Which layers get LoRA, and how their weights leave the models in diffusers' format."""

from __future__ import annotations

from typing import Any

from .errors import TrainingError

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections (self and cross)
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def lora_config(rank: int, alpha: float, targets: tuple[str, ...]):
    from peft import LoraConfig

    # gaussian A, zero B: the adapter starts as the identity, as diffusers' DreamBooth trainer;
    # no dropout, so the only randomness is the seeded noise, timesteps and data order.
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights="gaussian",
        target_modules=list(targets),
        lora_dropout=0.0,
    )


def add_lora(unet, text_encoder, *, unet_rank, unet_alpha, text_encoder_rank, text_encoder_alpha):
    """Add LoRA layers (in place; the caller seeds torch first). Returns the trainable params."""
    unet.add_adapter(lora_config(unet_rank, unet_alpha, UNET_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    if text_encoder is not None:
        text_encoder.add_adapter(
            lora_config(text_encoder_rank, text_encoder_alpha, TEXT_ENCODER_TARGETS)
        )
        params += [p for p in text_encoder.parameters() if p.requires_grad]
    return params


def peft_state(model) -> dict[str, Any]:
    """The LoRA weights of a model in peft's naming (what checkpoints store and restore)."""
    from peft.utils import get_peft_model_state_dict

    # no embedding layers are adapted; saying so skips peft's hub lookup of the vocabulary
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def restore_peft_state(model, state: dict[str, Any]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise TrainingError(f"checkpoint has LoRA weights this model lacks: {unexpected[:3]}")


def diffusers_layers(model) -> dict[str, Any]:
    """The LoRA weights in diffusers' naming, as ``save_lora_weights`` expects."""
    from diffusers.utils import convert_state_dict_to_diffusers

    return convert_state_dict_to_diffusers(peft_state(model))


def adapter_config_dict(model) -> dict[str, Any]:
    """peft's LoraConfig as a dict: stored in the safetensors header so alpha survives.

    Made the same in every process and on every machine, so the same seed gives the same adapter
    bytes: peft keeps ``target_modules`` as a set (its order follows the process's hash seed) and
    transformers records the base's local folder, a path of the training machine (the base is
    recorded, by id and content hash, in the adapter's metadata).
    """
    config = model.peft_config["default"].to_dict()
    for key, value in config.items():
        if isinstance(value, set | frozenset):
            config[key] = sorted(value)
    config["base_model_name_or_path"] = None
    return config


def count_lora_params(model, targets: tuple[str, ...], rank: int) -> int:
    """Parameters a rank-``rank`` LoRA on ``targets`` adds to ``model`` (A: r x in, B: out x r)."""
    import torch

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(
            name == t or name.endswith("." + t) for t in targets
        ):
            total += rank * (module.in_features + module.out_features)
    return total
