"""`avatarforge base ...` and `avatarforge doctor`."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import typer
from rich.table import Table

from ..base.config import BaseConfig, resolve_base
from ..base.tiny import build_tiny_base
from ..paths import build_dir, tiny_base_dir
from .common import console

base_app = typer.Typer(help="Build and inspect the base model.", no_args_is_help=True)


@base_app.command("build")
def build(
    out: Path = typer.Option(None, help="output folder (default: build/base/tiny-sd21)"),
    seed: int = typer.Option(0, min=0, help="seed of the random weights (same seed, same bytes)"),
    force: bool = typer.Option(False, help="rebuild even if the folder exists"),
) -> None:
    """Build the embedded tiny SD 2.1-shaped base (random weights, real CLIP vocab)."""
    info = build_tiny_base(out or tiny_base_dir(), seed=seed, force=force)
    console.print(f"base [bold]{info.base_id}[/] at {info.path}")
    console.print(f"content hash {info.content_hash}")


@base_app.command("info")
def info(
    base: str = typer.Argument("tiny", help="'tiny', a diffusers folder, or a hub id"),
) -> None:
    """Print the id and content hash of a base (hashes a real base once, then caches)."""
    found = resolve_base(BaseConfig(base=base))
    console.print_json(data=found.to_dict())


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "[red]missing[/]"


def doctor() -> None:
    """What is installed, which base, whether tritonserver and a GPU are there."""
    table = Table(title="avatarforge doctor", show_header=False)
    for dist in (
        "avatarforge", "torch", "diffusers", "peft", "transformers", "numpy",
        "nvidia-pytriton", "tritonclient", "moto", "dlib-bin", "opencv-python-headless",
    ):  # fmt: skip
        table.add_row(dist, _version(dist))
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    except ImportError:
        gpu = "unknown (torch missing)"
    table.add_row("GPU", gpu)
    from ..tritonserver.install import find_tritonserver

    try:
        table.add_row("tritonserver", str(find_tritonserver().binary))
    except FileNotFoundError as exc:
        table.add_row("tritonserver", f"[red]{exc}[/]")
    base = tiny_base_dir()
    table.add_row("tiny base", str(base) if base.exists() else "not built (avatarforge base build)")
    table.add_row("build dir", str(build_dir()))
    table.add_row("docker", shutil.which("docker") or "missing")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(base_app, name="base")
    app.command("doctor")(doctor)
