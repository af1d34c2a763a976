"""`avatarforge base ...` and `avatarforge doctor`."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import typer
from rich.markup import escape

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


@base_app.command("import")
def import_command(
    source: str = typer.Argument(
        ...,
        help="a diffusers folder, or a hub id (e.g. stabilityai/stable-diffusion-2-1-base) "
        "already in the local hub cache: nothing is downloaded",
    ),
    out: Path = typer.Option(None, help="output folder (default: build/base/<id>)"),
    base_id: str = typer.Option(
        None, "--id", help="the id adapters record (default: the hub id, or the folder's name)"
    ),
    expect_hash: str = typer.Option(
        None,
        "--expect-hash",
        help="the content hash the imported base must have (12+ characters), e.g. the one "
        "your deployment serves; otherwise nothing is written",
    ),
    force: bool = typer.Option(False, help="replace what is at --out"),
) -> None:
    """Check a real SD 2.x base (architecture, prediction type for its size, the download's
    hashes) and write it as the fp16 diffusers folder train, serve and deploy load."""
    from ..base.importer import import_base

    status = console.status("importing", spinner="line")
    status.start()  # reading, hashing and writing a full base takes a minute or more

    def phase(what: str) -> None:
        status.update(what)
        console.print(f"  {what}", highlight=False)

    try:
        info, found = import_base(
            source, out, base_id=base_id, expect_hash=expect_hash, force=force, on_phase=phase
        )
    finally:
        status.stop()
    from ..fullsize import PARAM_COUNTS

    params = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in found.params.items())
    size = " (SD 2.1's size)" if found.params == PARAM_COUNTS else ""
    console.print(f"base [bold]{info.base_id}[/] at {info.path}", soft_wrap=True)
    console.print(f"content hash {info.content_hash}", soft_wrap=True)
    console.print(
        f"{found.resolution} px, {found.prediction_type}; parameters {params}{size}; fp16",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"use it: avatarforge train DATASET --user NAME --base {info.path} "
        f"--resolution {found.resolution}; serve and deploy it as AVATARFORGE_BASE_SOURCE / "
        f"deploy.base = {info.path}",
        soft_wrap=True,
    )


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
        return "missing"


def doctor() -> None:
    """What is installed, which base, whether tritonserver and a GPU are there."""
    rows = [
        (dist, _version(dist)) for dist in (
            "avatarforge", "torch", "diffusers", "peft", "transformers", "numpy",
            "nvidia-pytriton", "tritonclient", "moto", "dlib-bin", "opencv-python-headless",
        )
    ]  # fmt: skip
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    except ImportError:
        gpu = "unknown (torch missing)"
    rows.append(("GPU", gpu))
    from ..tritonserver.install import find_tritonserver

    try:
        rows.append(("tritonserver", str(find_tritonserver().binary)))
    except FileNotFoundError as exc:
        rows.append(("tritonserver", f"missing: {exc}"))
    base = tiny_base_dir()
    rows.append(("tiny base", str(base) if base.exists() else "not built (avatarforge base build)"))
    rows.append(("build dir", str(build_dir())))
    rows.append(("docker", shutil.which("docker") or "missing"))
    # name and value on one line, never cut or wrapped: a path is copied from here whole
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        style = "red" if value.startswith("missing") else ""
        console.print(
            f"{name:<{width}}  " + (f"[{style}]{escape(value)}[/]" if style else escape(value)),
            soft_wrap=True,
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.add_typer(base_app, name="base")
    app.command("doctor")(doctor)
