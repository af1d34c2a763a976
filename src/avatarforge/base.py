"""The base model every step shares: the embedded tiny SD 2.1-shaped base, or a real one.

The reference implementation trained on one SD 2.1 variant and served another. Here a base is
always a :class:`BaseInfo` — an id plus a content hash of its weights — recorded in every adapter
and checked when the adapter is loaded.

The embedded base is built from configs, not downloaded: a seeded, random, tiny model with the
Stable Diffusion 2.1 architecture (UNet with linear projection and cross attention, a VAE with
SD's x8 downsampling, an OpenCLIP-style text encoder, the real CLIP BPE vocabulary from the
open-clip-torch wheel, SD2's "!" pad token) saved as an ordinary diffusers folder, so every later
step loads it with the same code as real weights.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fsutil import replace_dir
from .hashing import update_from_file
from .paths import tiny_base_dir
from .settings import ConfigError, Settings, setting

TINY = "tiny"
INFO_FILE = "avatarforge_base.json"
TINY_ID_PREFIX = "avatarforge/tiny-sd21"


class BaseError(RuntimeError):
    """The base model cannot be found, built or trusted."""


@dataclass(frozen=True)
class BaseInfo:
    """What identifies a base: adapters record it, loaders compare it."""

    base_id: str
    content_hash: str
    path: Path

    def to_dict(self) -> dict[str, str]:
        return {"base_id": self.base_id, "content_hash": self.content_hash, "path": str(self.path)}


@dataclass
class BaseConfig(Settings):
    section = "base"
    base: str = setting(
        TINY,
        "'tiny' (the embedded random SD 2.1-shaped base), a local diffusers folder, "
        "or a hub id such as stabilityai/stable-diffusion-2-1-base (needs allow_download)",
    )
    seed: int = setting(0, "seed of the embedded tiny base's random weights", ge=0)
    allow_download: bool = setting(
        False, "allow fetching a hub id; nothing is downloaded unless this is set"
    )

    def validate(self) -> None:
        if not self.base:
            raise ConfigError("base.base: must name 'tiny', a folder or a hub id")


# ---------------------------------------------------------------- content hash


def _weight_files(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != INFO_FILE]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def content_hash(folder: Path) -> str:
    """sha256 over every file's relative path and bytes (our own info file excluded)."""
    h = hashlib.sha256()
    for f in _weight_files(folder):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0")
        update_from_file(h, f)
        h.update(b"\0")
    return h.hexdigest()


def _stamp(folder: Path) -> list[list[Any]]:
    # Cheap fingerprint so a multi-GB base is hashed once, not on every load.
    return [
        [f.relative_to(folder).as_posix(), (st := f.stat()).st_size, st.st_mtime_ns]
        for f in _weight_files(folder)
    ]


def read_base_info(folder: Path, base_id: str | None = None) -> BaseInfo:
    """The BaseInfo of a diffusers folder, hashing it only when its files changed."""
    folder = Path(folder).resolve()
    if not (folder / "model_index.json").is_file():
        raise BaseError(f"{folder} is not a diffusers model folder (no model_index.json)")
    info_path = folder / INFO_FILE
    recorded: dict[str, Any] = {}
    if info_path.is_file():
        # only a cache of the hash: an unreadable one is rebuilt, not fatal
        with contextlib.suppress(OSError, ValueError):
            recorded = json.loads(info_path.read_text())
        if not isinstance(recorded, dict):
            recorded = {}
    stamp = _stamp(folder)
    if recorded.get("stamp") != stamp or "content_hash" not in recorded:
        recorded["content_hash"] = content_hash(folder)
        recorded["stamp"] = stamp
        recorded.setdefault("base_id", base_id or str(folder))
        # a read-only base is fine: it is hashed again next time
        with contextlib.suppress(OSError):
            info_path.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    return BaseInfo(base_id or recorded["base_id"], recorded["content_hash"], folder)


# ---------------------------------------------------------------- the embedded tiny base


def clip_bpe_path() -> Path:
    """The real CLIP BPE vocabulary shipped inside the open-clip-torch wheel (never imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise BaseError(
            "open-clip-torch is not installed; it ships the CLIP BPE vocabulary (run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise BaseError(f"CLIP BPE vocabulary missing at {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # The byte <-> unicode table of GPT-2/CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_vocab_and_merges(bpe: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The 49408-token CLIP BPE vocabulary and merges, built as open_clip builds them.

    ``bpe``: a copy of ``bpe_simple_vocab_16e6.txt.gz`` (where open-clip-torch is not installed,
    e.g. a GPU machine without network); default: the one in the open-clip-torch wheel.
    """
    lines = gzip.decompress(Path(bpe or clip_bpe_path()).read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges  # type: ignore[return-value]


def _tiny_components(seed: int) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,  # 512 px / 8, as SD 2.1-base
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # four blocks -> the x8 latent downsampling of SD's VAE
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",  # OpenCLIP ViT-H, as SD 2.x
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": sd21_scheduler()}


def clip_tokenizer(bpe: Path | None = None):
    """SD 2.x's tokenizer: the real CLIP BPE vocabulary, padded with "!" (OpenCLIP's pad, id 0)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(bpe)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)


def sd21_scheduler():
    """SD 2.1-base's noise schedule (epsilon prediction), sampled with DDIM."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_tiny_base(out: Path, seed: int = 0, *, force: bool = False) -> BaseInfo:
    """Build the embedded base into ``out`` (atomically). Same seed -> same bytes."""
    return build_base_folder(
        out, f"{TINY_ID_PREFIX}@seed{seed}", lambda: _tiny_components(seed), force=force
    )


def build_base_folder(
    out: Path,
    base_id: str,
    components: Callable[[], dict[str, Any]],
    *,
    force: bool = False,
    bpe: Path | None = None,
) -> BaseInfo:
    """Save ``components()`` (unet, vae, text_encoder, scheduler) with SD 2.x's tokenizer as a
    diffusers folder at ``out``, atomically, identified as ``base_id``.

    An existing folder is reused when it holds ``base_id`` and refused when it holds another
    base (``force`` rebuilds it). ``bpe``: see :func:`clip_vocab_and_merges`.
    """
    from diffusers import StableDiffusionPipeline

    quiet_hf()
    out = Path(out).resolve()
    if out.exists() and not force:
        info = read_base_info(out)
        if info.base_id != base_id:
            raise BaseError(f"{out} holds {info.base_id}, not {base_id}; use --force to rebuild")
        return info
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".base-", dir=out.parent))
    try:
        pipe = StableDiffusionPipeline(
            **components(),
            tokenizer=clip_tokenizer(bpe),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        model_dir = tmp / "model"
        pipe.save_pretrained(model_dir, safe_serialization=True)
        del pipe
        replace_dir(model_dir, out)  # readers see the old base or the new one, never none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read_base_info(out, base_id=base_id)


# ---------------------------------------------------------------- resolving and loading


def resolve_base(config: BaseConfig | None = None) -> BaseInfo:
    """Find (or build, for 'tiny') the configured base and return its identity."""
    config = config or BaseConfig()
    if config.base == TINY:
        return build_tiny_base(tiny_base_dir(), seed=config.seed)
    path = Path(config.base).expanduser()
    if path.exists():
        return read_base_info(path)
    if not config.allow_download:
        raise BaseError(
            f"base {config.base!r} is not a local folder; set allow_download "
            "(--allow-download) to fetch it from the hub"
        )
    from huggingface_hub import snapshot_download

    local = snapshot_download(
        config.base, allow_patterns=["*.json", "*.txt", "*.safetensors"], ignore_patterns=["*ema*"]
    )
    return read_base_info(Path(local), base_id=config.base)


def check_same_base(expected: dict[str, Any], actual: BaseInfo) -> None:
    """Refuse an adapter trained on another base (the reference implementation's fault)."""
    if expected.get("base_hash") != actual.content_hash:
        raise BaseError(
            "adapter was trained on base "
            f"{expected.get('base_id')!r} (hash {str(expected.get('base_hash'))[:12]}), "
            f"but the serving base is {actual.base_id!r} (hash {actual.content_hash[:12]}); "
            "an adapter only works on the base it was trained on"
        )


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def quiet_hf() -> None:
    """Silence hub-library chatter (load bars, torchvision notices); our logs say what matters."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_pipeline(info: BaseInfo, device: str | None = None, dtype: str | None = None):
    """A new StableDiffusionPipeline of the base: fp16 on CUDA, fp32 on CPU unless told."""
    import torch
    from diffusers import StableDiffusionPipeline

    quiet_hf()
    device = device or best_device()
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    pipe = StableDiffusionPipeline.from_pretrained(info.path, dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
