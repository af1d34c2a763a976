"""`avatarforge generate`: images from a served user model, straight from tritonserver
(``--url`` + ``--user``) or through the local MME front (``--mme`` + ``--target-model``)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..paths import build_dir
from .common import fail, save_images

TARGETS = "give --url and --user (tritonserver) or --mme and --target-model (local MME)"


def generate(
    prompt: str = typer.Option(..., "--prompt", help="what to draw"),
    url: str = typer.Option(
        None, "--url", help="tritonserver HTTP address, e.g. 127.0.0.1:8000 (with --user)"
    ),
    user: str = typer.Option(None, "--user", help="the user's model name on that tritonserver"),
    mme: str = typer.Option(
        None, "--mme", help="the local MME front, e.g. http://127.0.0.1:8090 (with --target-model)"
    ),
    target_model: str = typer.Option(
        None, "--target-model", help="the MME TargetModel, e.g. alice.tar.gz"
    ),
    negative_prompt: str = typer.Option(None, "--negative-prompt", help="what to avoid"),
    gen_args: str = typer.Option(None, "--gen-args", help="JSON, e.g. '{\"seed\": 1}'"),
    out: Path = typer.Option(
        None, help="output folder (default: build/generate/USER or build/generate/TARGET)"
    ),
) -> None:
    """Generate images with a served user model and write them as JPEGs."""
    direct = bool(url and user)
    if (url or user) and (mme or target_model):
        fail(f"{TARGETS}, not both", code=2)
    if not direct and not (mme and target_model):
        fail(TARGETS, code=2)
    if direct:
        from ..serving.client import ServingError as RequestError
        from ..serving.client import generate as request

        address, model, name = url, user, user
    else:
        from ..mme.front import EndpointError as RequestError
        from ..mme.generate import generate as request

        address, model, name = mme, target_model, target_model.removesuffix(".tar.gz")
    try:
        images = request(address, model, prompt, negative_prompt, gen_args)
    except RequestError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot reach {address}: {exc}")
    save_images(images, out or build_dir() / "generate" / name)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
