"""`avatarforge train` and `avatarforge generate-local`.

The train command's options are made from :class:`~avatarforge.train.TrainConfig`'s fields, so a
default, bound or help text is written once, in the config.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..names import InvalidNameError, check_user_id
from ..train.config import TrainConfig
from .common import config_options, console, fail, save_images


@config_options(TrainConfig)
def train_command(
    dataset_dir: Path = typer.Argument(
        ..., help="preprocessed dataset (folder with manifest.json)"
    ),
    user: str = typer.Option(..., "--user", help="user name: names the output folder and model"),
    out: Path = typer.Option(
        None, help="output folder (default: build/users/USER); the adapter goes to <out>/adapter"
    ),
    **options,
) -> None:
    """Train a DreamBooth LoRA (UNet + text encoder) on the serving base; resumable."""
    from ..base import BaseError
    from ..paths import build_dir
    from ..settings import ConfigError
    from ..train import TrainingError, TrainingStopped, train

    try:
        check_user_id(user, field="--user")
    except InvalidNameError as exc:
        fail(str(exc))
    try:
        config = TrainConfig(**options)
        result = train(dataset_dir, out or build_dir() / "users" / user, config)
    except TrainingStopped as exc:
        console.print(f"[yellow]stopped:[/] {exc}")
        raise typer.Exit(3) from None
    except (TrainingError, ConfigError, BaseError) as exc:
        fail(str(exc))
    console.print(f"adapter [bold]{result.adapter_dir}[/]")
    console.print(
        f"{result.steps} steps, final loss {result.losses[-1]:.4f}, "
        f"{result.step_seconds:.3f} s/step, peak memory {result.peak_memory_bytes / 2**20:.0f} MiB "
        f"({result.device}), {result.seconds:.1f} s"
    )


def generate_local(
    adapter: Path = typer.Option(
        ..., "--adapter", help="adapter folder made by `avatarforge train`"
    ),
    prompt: str = typer.Option(
        ..., "--prompt", help="prompt; name the person with the token, e.g. <<TOK>>"
    ),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="negative prompt"),
    gen_args: str = typer.Option(
        "", "--gen-args", help='generation parameters as JSON, e.g. {"steps": 30, "seed": 1}'
    ),
    out: Path = typer.Option(
        None, help="output folder (default: build/generate-local/ADAPTER-PARENT)"
    ),
    image_format: str = typer.Option("jpeg", "--format", help="jpeg or png"),
    base: str = typer.Option(
        "",
        "--base",
        help="where the base is, if not where the adapter says (its hash is still checked)",
    ),
    device: str = typer.Option("", help="torch device ('' : cuda when available, else cpu)"),
) -> None:
    """Generate with diffusers directly: the reference the Triton path is compared against."""
    from ..adapter import AdapterError, base_config_for, load_adapter, read_adapter
    from ..base import BaseConfig, BaseError, load_pipeline, resolve_base
    from ..generate import GenArgs, generate_images
    from ..paths import build_dir
    from ..settings import ConfigError

    if image_format not in ("jpeg", "png"):
        fail(f"--format: must be jpeg or png (got {image_format!r})")
    try:
        args = GenArgs.parse(gen_args)
        meta = read_adapter(adapter)
        info = resolve_base(BaseConfig(base=base) if base else base_config_for(meta))
        pipe = load_pipeline(info, device=device or None)
        load_adapter(pipe, adapter, info, "user")
        images = generate_images(pipe, prompt, negative_prompt or None, args)
    except (AdapterError, BaseError, ConfigError) as exc:
        fail(str(exc))
    folder = out or build_dir() / "generate-local" / Path(adapter).resolve().parent.name
    save_images(images, folder, suffix=f"-seed{args.seed}", image_format=image_format)


def register(app: typer.Typer) -> None:
    """Add this step's commands to the root app."""
    app.command("train")(train_command)
    app.command("generate-local")(generate_local)
