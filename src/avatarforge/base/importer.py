"""Importing a real base: a diffusers folder, or a hub id found in the local hub cache, checked
and written as the fp16 diffusers folder that train, serve and deploy load.

Nothing is written until every check passed, each naming what it found:

1. layout: ``model_index.json`` of a ``StableDiffusionPipeline`` with unet, vae, text_encoder,
   tokenizer and scheduler, and safetensors weights (``.bin`` is a pickle, which can run code
   when loaded: refused). Of a component's weights the fp16 variant
   (``*.fp16.safetensors``) is taken when there, else the plain file (fp32 or fp16).
2. the download: in a hub cache snapshot every file links to a blob named by its hash (sha256
   for weights, git's sha1 for small files); the bytes must have that hash, so a truncated or
   damaged download is refused, not trained on.
3. prediction type for the declared size: SD 2.1 at 768 px (UNet ``sample_size`` 96) predicts
   v (``v_prediction``), 2.1-base at 512 px (64) predicts the noise (``epsilon``). A scheduler
   that says otherwise would train and sample against the wrong target.
4. architecture: SD 2.x's, whatever its width — a UNet with linear projections whose cross
   attention takes the text encoder's width, 4 latent channels on both sides, an OpenCLIP
   (gelu) text encoder with the 49408-token vocabulary and SD 2.x's "!" pad token (SD 1.x,
   SDXL and others fail here, naming the field) — and every weight tensor has exactly the name
   and shape its config's model has (read from the safetensors headers, nothing loaded).

Then the folder is written (fp16 files copied byte for byte, others converted tensor by
tensor), hashed, compared with ``expect_hash`` when given, and moved into place atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fsutil import replace_dir
from ..hashing import update_from_file
from .identity import BaseError, BaseInfo, content_hash, read_base_info, record_base_info

# component -> (library, class, weights file stem)
WEIGHTS = {
    "unet": ("diffusers", "UNet2DConditionModel", "diffusion_pytorch_model"),
    "vae": ("diffusers", "AutoencoderKL", "diffusion_pytorch_model"),
    "text_encoder": ("transformers", "CLIPTextModel", "model"),
}
# what each published size predicts (stable-diffusion-2-1: 768 v; 2-1-base: 512 epsilon)
PREDICTION_FOR_SIZE = {512: "epsilon", 768: "v_prediction"}
SD2_PAD_TOKEN = "!"
CLIP_VOCAB = 49408
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_SHA1 = re.compile(r"^[0-9a-f]{40}$")


class ImportRefused(BaseError):
    """The source is not a base we can use as it is; the message says what was found."""

    status = 400


@dataclass(frozen=True)
class Source:
    """What a check found in the source folder (before anything is written)."""

    folder: Path
    weights: dict[str, Path]  # component -> the safetensors file to take
    resolution: int
    prediction_type: str
    params: dict[str, int]  # parameters per component, from the weights' headers


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ImportRefused(f"{path.name} missing in {path.parent}") from None
    except (OSError, ValueError) as exc:
        raise ImportRefused(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ImportRefused(f"{path}: not a JSON object")
    return data


# ---------------------------------------------------------------- 1. layout


def _pick_weights(folder: Path, component: str, stem: str) -> Path:
    """The component's fp16 variant file when there, else its plain safetensors file."""
    where = folder / component
    if list(where.glob("*.safetensors.index.json")):
        raise ImportRefused(
            f"{component}: sharded weights (*.safetensors.index.json) are not supported; "
            "SD 2.x components are single files"
        )
    for name in (f"{stem}.fp16.safetensors", f"{stem}.safetensors"):
        if (where / name).exists() or (where / name).is_symlink():
            return where / name
    if list(where.glob("*.bin")):
        raise ImportRefused(
            f"{component}: only .bin weights (a pickle, which can run code when loaded); "
            "give the safetensors files (the hub has them for SD 2.x)"
        )
    raise ImportRefused(f"{component}: no {stem}.safetensors (or .fp16.safetensors) in {where}")


def check_layout(folder: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """model_index.json and the weights file of each component."""
    index = _json(folder / "model_index.json")
    if index.get("_class_name") != "StableDiffusionPipeline":
        raise ImportRefused(
            f"model_index.json: pipeline {index.get('_class_name')!r}, not "
            "StableDiffusionPipeline (SD 2.x); SDXL, SD 3 and others are another architecture"
        )
    expected = {name: (cls,) for name, (_, cls, _) in WEIGHTS.items()}
    expected["tokenizer"] = ("CLIPTokenizer", "CLIPTokenizerFast")
    for name, classes in expected.items():
        got = index.get(name)
        if not isinstance(got, list) or len(got) != 2 or got[1] not in classes:
            raise ImportRefused(
                f"model_index.json: {name} is {got!r}; SD 2.x has {' or '.join(classes)}"
            )
    if not isinstance(index.get("scheduler"), list):
        raise ImportRefused("model_index.json: no scheduler")
    weights = {name: _pick_weights(folder, name, stem) for name, (_, _, stem) in WEIGHTS.items()}
    return index, weights


# ---------------------------------------------------------------- 2. the download


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_download(folder: Path, files: list[Path]) -> int:
    """Each of ``files`` that is a hub cache link (snapshots/<rev>/... -> blobs/<hash>) must
    exist and have its blob's hash. Returns how many were checked."""
    checked = 0
    for path in files:
        if not path.is_symlink():
            continue
        target = path.resolve()
        rel = path.relative_to(folder)
        if not target.exists():
            raise ImportRefused(
                f"{rel}: its blob {target.name} is missing from the hub cache (an interrupted "
                "download): download it again"
            )
        if target.parent.name != "blobs":
            continue
        if _SHA256.match(target.name):
            h = hashlib.sha256()
            update_from_file(h, target)
            found = h.hexdigest()
        elif _GIT_SHA1.match(target.name):
            found = _git_blob_sha1(target)
        else:
            continue
        if found != target.name:
            raise ImportRefused(
                f"{rel}: hash mismatch: the hub says {target.name[:16]}..., the file in the "
                f"cache hashes to {found[:16]}... (a damaged or truncated download): delete "
                f"{target} and download it again"
            )
        checked += 1
    return checked


# ---------------------------------------------------------------- 3. prediction type


def check_prediction(folder: Path) -> tuple[int, str]:
    """The declared size (UNet sample_size x the VAE's factor) and the scheduler's prediction
    type, refused when they do not belong together."""
    unet = _json(folder / "unet" / "config.json")
    vae = _json(folder / "vae" / "config.json")
    scheduler = _json(folder / "scheduler" / "scheduler_config.json")
    sample_size = unet.get("sample_size")
    factor = 2 ** (len(vae.get("block_out_channels") or [0]) - 1)
    if not isinstance(sample_size, int):
        raise ImportRefused(f"unet/config.json: sample_size {sample_size!r} is not a number")
    size = sample_size * factor
    prediction = scheduler.get("prediction_type", "epsilon")  # diffusers' default
    if size not in PREDICTION_FOR_SIZE:
        raise ImportRefused(
            f"unet/config.json: sample_size {sample_size} declares {size} px; SD 2.x bases are "
            "512 px (2.1-base) or 768 px (2.1)"
        )
    if prediction != PREDICTION_FOR_SIZE[size]:
        raise ImportRefused(
            f"scheduler/scheduler_config.json: prediction_type {prediction!r} at {size} px; "
            f"SD 2.x at {size} px predicts {PREDICTION_FOR_SIZE[size]!r} "
            "(stable-diffusion-2-1: 768 px, v_prediction; stable-diffusion-2-1-base: 512 px, "
            "epsilon): a wrong one trains and samples against the wrong target"
        )
    return size, prediction


# ---------------------------------------------------------------- 4. architecture


def _meta_model(folder: Path, component: str):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # shapes only: no memory, nothing read but the config
        if component == "unet":
            return UNet2DConditionModel.from_config(_json(folder / "unet" / "config.json"))
        if component == "vae":
            return AutoencoderKL.from_config(_json(folder / "vae" / "config.json"))
        return CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {
                k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                for k in f.keys()  # noqa: SIM118 (a safe_open handle is not a dict)
            }
    except Exception as exc:  # safetensors raises its own error types
        raise ImportRefused(f"{path.name}: not a readable safetensors file ({exc})") from None


def _check_weights(folder: Path, component: str, path: Path) -> int:
    """The file holds exactly the tensors the config's model has, in its shapes."""
    expected = {k: tuple(v.shape) for k, v in _meta_model(folder, component).state_dict().items()}
    found = _header(path)
    # older transformers saved this buffer; today's models do not keep it (harmless extra)
    extra = sorted(k for k in set(found) - set(expected) if not k.endswith("position_ids"))
    missing = sorted(set(expected) - set(found))
    wrong = sorted(k for k in set(expected) & set(found) if found[k][1] != expected[k])
    rel = path.relative_to(folder)
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {found[k][1]}, "
                         f"config says {expected[k]})")  # fmt: skip
        raise ImportRefused(f"{rel} does not match {component}/config.json: {'; '.join(parts)}")
    return sum(math.prod(found[k][1]) for k in expected)


def check_architecture(folder: Path, weights: dict[str, Path]) -> dict[str, int]:
    """SD 2.x's architecture (see the module docstring); parameters per component."""
    configs = {name: _json(folder / name / "config.json") for name in WEIGHTS}
    width = configs["text_encoder"].get("hidden_size")
    rules = (  # (component, field, SD 2.x's value, what it means)
        ("unet", "use_linear_projection", True, "True (SD 1.x has convolutions there)"),
        ("unet", "cross_attention_dim", width, f"the text encoder's hidden_size ({width})"),
        ("unet", "in_channels", 4, "4 latent channels"),
        ("unet", "out_channels", 4, "4 latent channels"),
        ("unet", "addition_embed_type", None, "none (SDXL conditions on more than the text)"),
        ("unet", "class_embed_type", None, "none"),
        ("vae", "latent_channels", 4, "4"),
        ("text_encoder", "hidden_act", "gelu", "'gelu' (OpenCLIP; SD 1.x's CLIP: quick_gelu)"),
        ("text_encoder", "vocab_size", CLIP_VOCAB, f"{CLIP_VOCAB} (the CLIP vocabulary)"),
    )
    for component, field, expected, what in rules:
        found = configs[component].get(field)
        if found != expected:
            raise ImportRefused(f"{component}/config.json: {field} is {found!r}; SD 2.x: {what}")
    _check_tokenizer(folder)
    return {name: _check_weights(folder, name, path) for name, path in weights.items()}


def _check_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    except (OSError, ValueError, TypeError) as exc:
        raise ImportRefused(f"tokenizer: cannot be loaded ({exc})") from None
    if len(tokenizer) != CLIP_VOCAB or tokenizer.pad_token != SD2_PAD_TOKEN:
        raise ImportRefused(
            f"tokenizer: {len(tokenizer)} tokens, pad token {tokenizer.pad_token!r}; SD 2.x's "
            f"has {CLIP_VOCAB} and pads with {SD2_PAD_TOKEN!r} (SD 1.x pads with <|endoftext|>)"
        )


def check_source(folder: Path, on_phase: Callable[[str], None] | None = None) -> Source:
    """Every check (module docstring) on ``folder``; nothing is written."""
    say = on_phase or (lambda _: None)
    folder = Path(folder)
    say("checking the layout")
    _, weights = check_layout(folder)
    small = [p for p in folder.rglob("*") if p.suffix in (".json", ".txt")]
    read = [*small, *weights.values()]
    if any(p.is_symlink() for p in read):  # a hub cache snapshot
        say("checking the download against the hub's hashes (reads the weights once)")
        check_download(folder, read)
    size, prediction = check_prediction(folder)
    say("checking the architecture")
    params = check_architecture(folder, weights)
    return Source(folder, weights, size, prediction, params)


# ---------------------------------------------------------------- writing


def _write_fp16(source: Path, dest: Path) -> None:
    """``source``'s tensors in fp16: the same bytes when every float tensor is fp16 already."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    floats = {"F16", "F32", "F64", "BF16"}
    header = _header(source)
    if all(dtype == "F16" for dtype, _ in header.values() if dtype in floats):
        shutil.copyfile(source, dest)  # follows a cache link: the blob's bytes
        return
    import torch

    tensors = {}
    with safe_open(str(source), "pt") as f:
        for key in sorted(header):
            t = f.get_tensor(key)
            tensors[key] = t.to(torch.float16) if t.is_floating_point() else t
    save_file(tensors, str(dest), metadata={"format": "pt"})


def _model_index(index: dict[str, Any]) -> dict[str, Any]:
    """The source's model_index with what we do not carry (safety checker, feature
    extractor, image encoder) set to none, as the embedded bases have it."""
    out = {k: v for k, v in index.items() if not k.startswith("_") or k == "_diffusers_version"}
    out = {"_class_name": "StableDiffusionPipeline", **out}
    for name in ("feature_extractor", "image_encoder", "safety_checker"):
        out[name] = [None, None]
    out["requires_safety_checker"] = False
    return dict(sorted(out.items()))


def _slug(base_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", base_id).strip("-.") or "base"


def default_out(base_id: str) -> Path:
    from ..paths import build_dir

    return build_dir() / "base" / _slug(base_id)


def hub_id_of(folder: Path) -> str | None:
    """``org/name`` of a hub cache snapshot (.../models--org--name/snapshots/<rev>), else None."""
    parts = Path(folder).resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return None


def import_base(
    source: str | Path,
    out: Path | None = None,
    *,
    base_id: str | None = None,
    expect_hash: str | None = None,
    force: bool = False,
    on_phase: Callable[[str], None] | None = None,
) -> tuple[BaseInfo, Source]:
    """Check ``source`` (a diffusers folder, or a hub id resolved in the local hub cache only)
    and write it as an fp16 diffusers folder at ``out`` (default build/base/<id>), identified
    as ``base_id`` (default: the hub id, or the folder's name). ``expect_hash``: the content
    hash (or its first 12+ characters) the result must have; else nothing is left at ``out``.
    An existing ``out`` is replaced only with ``force``."""
    from .hub import local_snapshot

    say = on_phase or (lambda _: None)
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path
        base_id = base_id or hub_id_of(folder) or folder.resolve().name
    elif path.exists():
        raise ImportRefused(f"{source}: not a folder (a diffusers folder or a hub id)")
    else:
        folder = local_snapshot(str(source))
        base_id = base_id or str(source)
    if expect_hash is not None and len(expect_hash) < 12:
        raise ImportRefused("--expect-hash: give at least 12 characters of the content hash")
    out = Path(out or default_out(base_id)).resolve()
    if out.exists() and not force:
        held = read_base_info(out) if (out / "model_index.json").is_file() else None
        what = f"base {held.base_id} ({held.content_hash[:12]})" if held else "files"
        raise BaseError(f"{out} already holds {what}; use --force to replace it")
    found = check_source(folder, say)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=out.parent))
    try:
        model = tmp / "model"
        say("writing fp16 weights")
        for name, (_, _, stem) in WEIGHTS.items():
            (model / name).mkdir(parents=True)
            shutil.copyfile(folder / name / "config.json", model / name / "config.json")
            _write_fp16(found.weights[name], model / name / f"{stem}.safetensors")
        (model / "scheduler").mkdir()
        shutil.copyfile(folder / "scheduler" / "scheduler_config.json",
                        model / "scheduler" / "scheduler_config.json")  # fmt: skip
        (model / "tokenizer").mkdir()
        for f in sorted((folder / "tokenizer").iterdir()):
            if f.suffix in (".json", ".txt"):
                shutil.copyfile(f, model / "tokenizer" / f.name)
        index = _model_index(_json(folder / "model_index.json"))
        (model / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        say("hashing the result")
        digest = content_hash(model)
        if expect_hash is not None and not digest.startswith(expect_hash.lower()):
            raise ImportRefused(
                f"content hash {digest[:16]}... is not the expected {expect_hash[:16]}...: "
                f"these are other weights (or another conversion) than the ones expected; "
                f"nothing was written to {out}"
            )
        # the hash is recorded with the files' stamp: read_base_info trusts it, not hashing GBs
        # again (a rename keeps sizes and times)
        facts = {"resolution": found.resolution, "prediction_type": found.prediction_type}
        record_base_info(model, base_id, digest, imported_from=str(source), **facts)
        replace_dir(model, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read_base_info(out, base_id=base_id), found
