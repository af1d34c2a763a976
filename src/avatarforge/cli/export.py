"""`avatarforge export`: a user's adapter in the formats other tools load."""

from __future__ import annotations

from pathlib import Path

import typer

from ..names import check_user_id
from .common import console, fail


def export_command(
    user: str = typer.Argument(..., help="user whose adapter to export"),
    adapter: Path = typer.Option(
        None, "--adapter", help="adapter folder (default: build/users/USER/adapter)"
    ),
    fmt: str = typer.Option(
        "kohya",
        "--format",
        help="kohya: the kohya-ss LoRA .safetensors that ComfyUI and AUTOMATIC1111 load",
    ),
    out: Path = typer.Option(
        None, "--out", help="output file (default: build/export/kohya/USER.safetensors)"
    ),
) -> None:
    """Export a user's LoRA for ComfyUI / AUTOMATIC1111 (kohya-ss format, SD 2.x)."""
    from ..base.tiny import TINY_ID_PREFIX
    from ..export import FORMATS, KOHYA, export_kohya
    from ..fullsize import FULL_ID_PREFIX
    from ..paths import build_dir

    check_user_id(user, field="USER")
    if fmt not in FORMATS:
        fail(f"--format: must be one of {', '.join(FORMATS)} (got {fmt!r})")
    adapter = adapter or build_dir() / "users" / user / "adapter"
    out = out or build_dir() / "export" / KOHYA / f"{user}.safetensors"
    if out.suffix != ".safetensors":
        fail(f"--out: {out} must end in .safetensors (the tools list LoRA files by extension)")
    replaced = out.exists()
    result = export_kohya(adapter, out)
    console.print(
        f"{'replaced' if replaced else 'wrote'} [bold]{result.path}[/] "
        f"({result.path.stat().st_size / 1024:.1f} KiB; {result.unet_pairs} UNet + "
        f"{result.text_encoder_pairs} text-encoder LoRA pairs)",
        soft_wrap=True,
    )
    base_id = result.metadata["avatarforge.base_id"]
    if base_id.startswith((TINY_ID_PREFIX, FULL_ID_PREFIX)):
        console.print(
            f"[yellow]note:[/] trained on {base_id}, a base of random weights for tests: "
            "ComfyUI and AUTOMATIC1111 need an adapter trained on real SD 2.1 weights "
            "(see 'Real weights on a GPU' in README.md)",
            soft_wrap=True,
        )
    token = result.metadata.get("modelspec.trigger_phrase", "<<TOK>>")
    console.print(
        f"use it with the SD 2.1 base it was trained on ({base_id}):\n"
        f"  ComfyUI: copy to ComfyUI/models/loras/, add a LoraLoader node, prompt "
        f"'a photo of {token} person'\n"
        f"  AUTOMATIC1111: copy to stable-diffusion-webui/models/Lora/, prompt "
        f"'a photo of {token} person <lora:{result.path.stem}:1>'",
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    """Add this step's commands to the root app."""
    app.command("export")(export_command)
