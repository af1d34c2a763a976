"""Text-to-image with a (possibly adapted) pipeline: one function for every caller.

`avatarforge generate-local`, the Triton user model and the demo all call
:func:`generate_images`, so an image from the server can be compared bit for bit with the
reference path. Request parameters are a validated :class:`GenArgs`; a bad field is a
:class:`~avatarforge.settings.ConfigError` that names it.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image

from .errors import AvatarforgeError
from .settings import ConfigError, Settings, setting

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


@dataclass
class GenArgs(Settings):
    """Generation parameters a request may set (JSON `gen_args`); bounds keep a GPU safe."""

    section = "gen_args"
    steps: int = setting(30, "denoising steps", ge=1, le=150)
    guidance_scale: float = setting(7.5, "classifier-free guidance scale", ge=0.0, le=30.0)
    seed: int = setting(0, "random seed; same seed, same image", ge=0, le=2**32 - 1)
    height: int = setting(512, "image height in pixels (multiple of 8)", ge=64, le=1024)
    width: int = setting(512, "image width in pixels (multiple of 8)", ge=64, le=1024)
    num_images: int = setting(1, "images per prompt", ge=1, le=8)
    scheduler: str = setting("ddim", "sampler", choices=tuple(SCHEDULERS))

    # Names other clients send for our fields: the published sample's and diffusers' pipeline
    # arguments, AUTOMATIC1111's API, ComfyUI's sampler node. Accepted as given, one per field.
    ALIASES: ClassVar[dict[str, str]] = {
        "num_inference_steps": "steps",
        "num_images_per_prompt": "num_images",
        "cfg_scale": "guidance_scale",
        "cfg": "guidance_scale",
        "sampler": "scheduler",
    }
    # Fields that belong elsewhere in a request: what to do instead.
    NOT_HERE: ClassVar[dict[str, str]] = {
        "prompt": "send it as the prompt input, not inside gen_args",
        "negative_prompt": "send it as the negative_prompt input, not inside gen_args",
        "generator": "give seed (an integer) instead",
    }

    def validate(self) -> None:
        for name in ("steps", "seed", "height", "width", "num_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"gen_args.{name}: must be an integer (got {value!r})")
        for name in ("height", "width"):
            if (value := getattr(self, name)) % 8:
                raise ConfigError(f"gen_args.{name}: must be a multiple of 8 (got {value})")

    @classmethod
    def parse(
        cls, text: str | bytes | dict[str, Any] | None, defaults: GenArgs | None = None
    ) -> GenArgs:
        """From a request's JSON text (empty or None -> defaults); errors name the field.
        ``defaults``: what an omitted field takes (a serving instance's: :func:`serving_defaults`);
        None: the fields' own."""
        if text is None or (isinstance(text, str | bytes) and not text.strip()):
            return defaults or cls()
        if isinstance(text, dict):
            data = text
        else:
            try:
                data = json.loads(text)
            # ValueError: also UnicodeDecodeError and an int of over 4300 digits; RecursionError:
            # nesting deeper than the interpreter's limit (a few KB of '[')
            except (ValueError, RecursionError) as exc:
                raise ConfigError(f"gen_args: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"gen_args: must be a JSON object (got {type(data).__name__})")
        if defaults is not None:
            return cls.from_dict({**defaults.to_dict(), **canonical_fields(data)})
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenArgs:
        """Like :meth:`Settings.from_dict`, also accepting :attr:`ALIASES`; an unknown field's
        error suggests the closest known name ("did you mean ...")."""
        return super().from_dict(canonical_fields(data))


# What a served request that leaves its size or steps out gets (serving.default_size and
# serving.default_steps at 0, "by device and base"): GenArgs' own 512 px and 30 steps (SD 2.1
# base's size; about a second on a GPU), except for the embedded tiny base on a CPU. There one
# 512 px, 30-step image took 3 s on a quiet 2-core CPU and 42 s to over 60 s on a busy one
# (serving.request_timeout_s is 60 s); 256 px and 12 steps took 0.4 s quiet and under 30 s
# with two busy loops beside the demo (2.4 s a step): its path, not its pixels, is what the
# tiny base shows.
TINY_CPU_DEFAULTS: dict[str, int] = {"steps": 12, "height": 256, "width": 256}


def serving_defaults(*, tiny_on_cpu: bool, steps: int = 0, size: int = 0) -> GenArgs:
    """What an omitted gen_args field takes on a serving instance: the instance's
    ``serving.default_steps`` and ``serving.default_size`` where set (not 0), else by device and
    base (:data:`TINY_CPU_DEFAULTS` for the tiny base on a CPU, else GenArgs' own)."""
    values = dict(TINY_CPU_DEFAULTS) if tiny_on_cpu else {}
    if steps:
        values["steps"] = steps
    if size:
        values["height"] = values["width"] = size
    return GenArgs(**values)


def canonical_fields(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with GenArgs' aliases renamed to their fields; ConfigError for an unknown field
    (suggesting the closest known name), a field given twice, or one that belongs elsewhere."""
    fields = [f.name for f in dataclasses.fields(GenArgs)]
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    unknown = []
    for key, value in data.items():
        if key in GenArgs.NOT_HERE:
            raise ConfigError(f"gen_args.{key}: {GenArgs.NOT_HERE[key]}")
        name = GenArgs.ALIASES.get(key, key)
        if name not in fields:
            unknown.append(str(key))
        elif name in out:
            raise ConfigError(f"gen_args: {given_as[name]!r} and {key!r} both set {name}; give one")
        else:
            out[name], given_as[name] = value, key
    if unknown:
        raise ConfigError(
            f"gen_args: unknown field(s) {', '.join(sorted(unknown))} ({_hint(unknown, fields)})"
        )
    return out


def _hint(unknown: list[str], fields: list[str]) -> str:
    """ "did you mean ..." for each unknown name close to a field or alias, else the fields."""
    hints = []
    for key in sorted(unknown):
        match = difflib.get_close_matches(key, [*fields, *GenArgs.ALIASES], n=1, cutoff=0.6)
        if match:
            name = match[0]
            alias = f" (= {GenArgs.ALIASES[name]})" if name in GenArgs.ALIASES else ""
            hints.append(f"{key}: did you mean {name}{alias}?")
    return "; ".join(hints) if hints else f"fields: {', '.join(fields)}"


def set_scheduler(pipe, name: str) -> None:
    """Swap the sampler, keeping the base's noise schedule (its scheduler config)."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    if type(pipe.scheduler) is not cls:
        pipe.scheduler = cls.from_config(pipe.scheduler.config)


class GenerationStopped(AvatarforgeError):
    """The caller's ``stop`` said so between two denoising steps (see :func:`generate_images`)."""

    status = 504  # what stops a run is a deadline


def _stop_hook(
    stop: Callable[[], bool] | None, on_step: Callable[[int, int], None] | None = None
) -> dict:
    """The pipeline's per-step callback: ``on_step(done, total)`` hears each denoising step;
    ``stop`` raises GenerationStopped, so the remaining steps and the VAE decode never run."""
    if stop is None and on_step is None:
        return {}

    def on_step_end(pipe, step, timestep, callback_kwargs):
        if on_step is not None:
            on_step(step + 1, pipe.num_timesteps)
        if stop is not None and stop():
            raise GenerationStopped(f"stopped after {step + 1} denoising steps")
        return callback_kwargs

    return {"callback_on_step_end": on_step_end}


def generate_images(
    pipe,
    prompt: str,
    negative_prompt: str | None = None,
    args: GenArgs | None = None,
    *,
    stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """Run the pipeline; the generator is seeded on the CPU so CPU and GPU runs share noise.
    ``stop``: asked after every denoising step; True ends the run with GenerationStopped.
    ``on_step(done, total)``: told after every denoising step (a progress bar: on a CPU a
    512 px image of a real base takes minutes)."""
    import torch

    args = args or GenArgs()
    if not prompt or not prompt.strip():
        raise ConfigError("prompt: must not be empty")
    set_scheduler(pipe, args.scheduler)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    result = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt or None,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        generator=generator,
        **_stop_hook(stop, on_step),
    )
    return list(result.images)


# Samplers that draw fresh noise at every step from the request's generator.
STEP_NOISE_SCHEDULERS = frozenset({"euler_a"})


def batch_key(args: GenArgs) -> tuple | None:
    """What rows must share to run as one pipeline call (:func:`generate_batch`) and still get
    the images each gets alone; None: this row runs alone.

    Each row keeps its own generator, and its initial noise is drawn exactly as
    :func:`generate_images` draws it. A sampler that draws noise at every step draws it image
    by image from the row's generator in a batch, which equals one draw for all of a row's
    images only when an image's latents are a multiple of 16 values (torch's CPU normal
    sampler works in blocks of 16; 4 latent channels at 1/8 of the size, the largest VAE
    factor): other rows of that kind with several images run alone.
    """
    latent_values = 4 * (args.height // 8) * (args.width // 8)
    if args.scheduler in STEP_NOISE_SCHEDULERS and args.num_images > 1 and latent_values % 16:
        return None
    return (args.height, args.width, args.steps, args.scheduler, args.guidance_scale,
            args.num_images)  # fmt: skip


def generate_batch(
    pipe,
    rows: list[tuple[str, str | None, GenArgs]],
    *,
    stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[list[Image.Image]]:
    """Several (prompt, negative_prompt, args) rows with one :func:`batch_key` as ONE pipeline
    call (one UNet batch); returns each row's images. ``stop``, ``on_step``: as for
    :func:`generate_images`.

    Per row, as :func:`generate_images` would: a CPU generator seeded with the row's seed draws
    its initial latents (passed in as ``latents``) and any later noise of its images; an omitted
    negative prompt is the empty prompt, which is what the pipeline uses for none. The images
    equal separate runs up to float rounding: a larger batch sums in another order. Adapters per
    row are the caller's business (see :mod:`avatarforge.serving.lora_slots`).
    """
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    if not rows:
        return []
    keys = {batch_key(args) for _, _, args in rows}
    if len(keys) != 1 or None in keys:
        raise ConfigError(
            "generate_batch: rows must share size, steps, scheduler, guidance_scale and "
            "num_images (and not need to run alone)"
        )
    for prompt, _, _ in rows:
        if not prompt or not prompt.strip():
            raise ConfigError("prompt: must not be empty")
    args = rows[0][2]
    set_scheduler(pipe, args.scheduler)
    n = args.num_images
    # what the pipeline's own prepare_latents would draw for one row of n images
    device = pipe._execution_device
    dtype = pipe.text_encoder.dtype
    factor = pipe.vae_scale_factor
    shape = (n, pipe.unet.config.in_channels, args.height // factor, args.width // factor)
    generators, latents = [], []
    for _, _, row_args in rows:
        generator = torch.Generator("cpu").manual_seed(row_args.seed)
        latents.append(randn_tensor(shape, generator=generator, device=device, dtype=dtype))
        generators += [generator] * n  # the row's images draw later noise from its generator
    negatives = [negative or "" for _, negative, _ in rows]
    result = pipe(
        prompt=[prompt for prompt, _, _ in rows],
        negative_prompt=negatives if any(negatives) else None,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        num_images_per_prompt=n,
        generator=generators,
        latents=torch.cat(latents),
        **_stop_hook(stop, on_step),
    )
    images = list(result.images)
    return [images[i * n : (i + 1) * n] for i in range(len(rows))]


def to_jpeg_base64(image: Image.Image, quality: int = 95) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def from_jpeg_base64(text: str | bytes) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image
