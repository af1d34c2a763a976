"""The one adapter format: a diffusers LoRA folder plus our metadata, checked on load.

An adapter folder holds
- ``pytorch_lora_weights.safetensors``: diffusers' LoRA format (keys ``unet.*`` and
  ``text_encoder.*``, peft's rank/alpha kept in the safetensors header), so stock
  ``pipe.load_lora_weights(dir)`` loads it;
- ``avatarforge_adapter.json``: :class:`AdapterMetadata` — which base it was trained on (id and
  content hash), ranks, alphas, token, prompts, steps, dataset hash, trainer version, seed, and
  the sha256 of the weights file so a truncated copy is caught before it is served.

:func:`load_adapter` refuses an adapter whose base hash differs from the serving base (the
reference implementation trained on one SD 2.1 variant and served another).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base.config import TINY, BaseConfig
from .base.identity import BaseInfo, check_same_base
from .base.tiny import TINY_ID_PREFIX
from .errors import AvatarforgeError
from .fsutil import replace_dir
from .hashing import sha256_file

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default name
METADATA_FILE = "avatarforge_adapter.json"
FORMAT_VERSION = 1
MAX_METADATA_BYTES = 1024**2  # ours is about 1 KiB; a larger file is not read
_KINDS = {"str": str, "int": int, "float": (int, float), "bool": bool}  # JSON types of fields


class AdapterError(AvatarforgeError, ValueError):
    """An adapter folder is missing, incomplete, corrupt, or not loaded where expected."""

    status = 400


@dataclass
class AdapterMetadata:
    """What an adapter is and how it was made; written beside the weights."""

    base_id: str
    base_hash: str
    unet_rank: int
    unet_alpha: float
    text_encoder_rank: int  # 0: no text encoder adapter
    text_encoder_alpha: float
    token: str
    instance_prompt: str
    class_prompt: str
    steps: int
    dataset_hash: str
    trainer_version: str
    seed: int
    resolution: int = 512
    prior_preservation: bool = True
    weights_dtype: str = "float16"
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterMetadata:
        if not isinstance(data, dict):
            raise AdapterError(
                f"adapter metadata must be a JSON object (got {type(data).__name__})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        if missing := sorted(required - set(data)):
            raise AdapterError(f"adapter metadata lacks field(s) {', '.join(missing)}")
        _check_types(data)
        if (version := data.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
            raise AdapterError(
                f"adapter format version {version} is newer than this avatarforge "
                f"understands ({FORMAT_VERSION}); upgrade avatarforge"
            )
        # unknown keys from a newer minor writer are kept, not dropped
        extra = dict(data.get("extra", {}))
        extra.update({k: v for k, v in data.items() if k not in known})
        values = {k: v for k, v in data.items() if k in known and k != "extra"}
        return cls(**values, extra=extra)


def _check_types(data: dict[str, Any]) -> None:
    """Each known field has its JSON type (a hostile file must not reach code that assumes it)."""
    for f in dataclasses.fields(AdapterMetadata):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name == "extra":
            ok, expected = isinstance(value, dict), "a JSON object"
        else:
            kind = _KINDS[str(f.type)]
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            expected = {"str": "a string", "bool": "true or false"}.get(str(f.type), "a number")
        if not ok:
            raise AdapterError(
                f"adapter metadata: {f.name} must be {expected} (got {_short(value)})"
            )
    digest = data.get("weights_sha256", "")
    if digest and not (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise AdapterError(
            f"adapter metadata: weights_sha256 must be 64 lower-case hex digits (got "
            f"{_short(digest)})"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def canonicalize_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys, in place.

    safetensors writes its header from a hash map, so the same tensors and metadata can give
    different bytes from run to run; sorting makes "same seed -> same adapter bytes" hold. The
    tensor data and its offsets are unchanged; the header stays space-padded to 8 bytes.
    """
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def save_adapter(
    adapter_dir: Path,
    unet_layers: dict[str, Any],
    text_encoder_layers: dict[str, Any] | None,
    metadata: AdapterMetadata,
    *,
    unet_lora_config: dict[str, Any] | None = None,
    text_encoder_lora_config: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write an adapter folder atomically (replacing an old one); returns its path.

    ``*_layers`` are diffusers-format LoRA state dicts (see ``avatarforge.train.lora``);
    ``*_lora_config`` are peft ``LoraConfig.to_dict()`` — saved in the safetensors header, where
    diffusers reads rank and alpha back (a bare state dict would lose alpha).
    ``extra_files`` maps file names to text written beside the weights (e.g. the train config).
    """
    import torch
    from diffusers import StableDiffusionPipeline

    if not unet_layers:
        raise AdapterError("save_adapter: no UNet LoRA weights to save")
    dtype = getattr(torch, metadata.weights_dtype)
    # contiguous copies: safetensors refuses views, and the bytes must not depend on strides
    unet_layers = {k: v.detach().to("cpu", dtype).contiguous() for k, v in unet_layers.items()}
    if text_encoder_layers:
        text_encoder_layers = {
            k: v.detach().to("cpu", dtype).contiguous() for k, v in text_encoder_layers.items()
        }
    adapter_dir = Path(adapter_dir)
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{adapter_dir.name}-", dir=adapter_dir.parent))
    try:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=unet_layers,
            text_encoder_lora_layers=text_encoder_layers or None,
            weight_name=WEIGHTS_FILE,
            unet_lora_adapter_metadata=unet_lora_config,
            text_encoder_lora_adapter_metadata=text_encoder_lora_config
            if text_encoder_layers
            else None,
        )
        canonicalize_header(tmp / WEIGHTS_FILE)
        metadata = dataclasses.replace(metadata, weights_sha256=sha256_file(tmp / WEIGHTS_FILE))
        (tmp / METADATA_FILE).write_text(
            json.dumps(metadata.to_dict(), indent=2, sort_keys=True) + "\n"
        )
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_dir(tmp, adapter_dir)  # a reader sees the old adapter or the new one, never none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return adapter_dir


def read_adapter(adapter_dir: Path) -> AdapterMetadata:
    """The metadata of an adapter folder, after checking that its weights are intact."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir} is not an adapter folder (no such directory)")
    meta_path, weights = adapter_dir / METADATA_FILE, adapter_dir / WEIGHTS_FILE
    for path in (meta_path, weights):
        if not path.is_file():
            raise AdapterError(f"{adapter_dir} is not a complete adapter: {path.name} is missing")
    if meta_path.stat().st_size > MAX_METADATA_BYTES:
        raise AdapterError(f"{meta_path} is larger than {MAX_METADATA_BYTES // 1024} KiB")
    try:
        data = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{meta_path} is not valid JSON ({exc})") from None
    except RecursionError:
        raise AdapterError(f"{meta_path} is not adapter metadata (nested too deeply)") from None
    try:
        meta = AdapterMetadata.from_dict(data)
    except TypeError as exc:
        raise AdapterError(f"{meta_path}: {exc}") from None
    if meta.weights_sha256 and sha256_file(weights) != meta.weights_sha256:
        raise AdapterError(
            f"{weights} does not match the sha256 recorded in {METADATA_FILE} "
            "(truncated or altered copy)"
        )
    return meta


def base_config_for(meta: AdapterMetadata) -> BaseConfig:
    """The BaseConfig that finds the base an adapter was trained on (its hash is checked later)."""
    prefix = f"{TINY_ID_PREFIX}@seed"
    if meta.base_id.startswith(prefix) and meta.base_id[len(prefix) :].isdigit():
        return BaseConfig(base=TINY, seed=int(meta.base_id[len(prefix) :]))
    return BaseConfig(base=meta.base_id)


def load_adapter(pipe, adapter_dir: Path, base: BaseInfo, adapter_name: str) -> AdapterMetadata:
    """Check the adapter was trained on ``base``, then load it into ``pipe`` as ``adapter_name``.

    ``pipe`` must be a pipeline of ``base`` (see :func:`avatarforge.base.pipeline.load_pipeline`).
    """
    meta = read_adapter(adapter_dir)
    check_same_base(meta.to_dict(), base)
    if adapter_name in _loaded_adapters(pipe):
        raise AdapterError(f"an adapter named {adapter_name!r} is already loaded")
    pipe.load_lora_weights(str(adapter_dir), weight_name=WEIGHTS_FILE, adapter_name=adapter_name)
    return meta


def _loaded_adapters(pipe) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def unload_adapter(pipe, adapter_name: str) -> None:
    """Remove one adapter; with none left, the LoRA layers go too and the base is exact again."""
    loaded = _loaded_adapters(pipe)
    if adapter_name not in loaded:
        raise AdapterError(
            f"no adapter named {adapter_name!r} is loaded (loaded: {sorted(loaded) or 'none'})"
        )
    if loaded == {adapter_name}:
        pipe.unload_lora_weights()  # removes the peft wrappers: the original modules come back
    else:
        pipe.delete_adapters(adapter_name)
