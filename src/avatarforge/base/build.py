"""A base as a diffusers folder: components saved with SD 2.x's tokenizer and noise schedule.

The tokenizer is the real CLIP BPE vocabulary shipped inside the open-clip-torch wheel, padded
with SD2's "!"; the folder is written atomically and identified by id + content hash, so every
later step loads it with the same code as real weights.
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..fsutil import replace_dir
from .identity import BaseError, BaseInfo, read_base_info
from .logs import quiet_hf


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
    out = Path(out).resolve()
    if out.exists() and not force:
        info = read_base_info(out)
        if info.base_id != base_id:
            raise BaseError(f"{out} holds {info.base_id}, not {base_id}; use --force to rebuild")
        return info
    # imported only to build: diffusers takes seconds to import, a built base needs none of it
    from diffusers import StableDiffusionPipeline

    quiet_hf()
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
