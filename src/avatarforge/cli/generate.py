"""`avatarforge generate`: images from a served user model, straight from tritonserver
(``--url`` + ``--user``), through the local MME front (``--mme`` + ``--target-model``), or from a
SageMaker multi-model endpoint (``--endpoint`` + ``--user``, boto3).

Every mode saves the JPEGs exactly as the server sent them, each as a new numbered file:
nothing is re-encoded, nothing is overwritten."""

from __future__ import annotations

from pathlib import Path

import typer

from ..paths import build_dir
from .common import fail, save_jpeg_bytes

TARGETS = (
    "give --url and --user (tritonserver), --mme and --target-model (local MME), "
    "or --endpoint and --user (SageMaker endpoint)"
)


def generate(
    prompt: str = typer.Option(..., "--prompt", help="what to draw"),
    url: str = typer.Option(
        None, "--url", help="tritonserver HTTP address, e.g. 127.0.0.1:8000 (with --user)"
    ),
    user: str = typer.Option(
        None, "--user", help="the user's model name (on tritonserver, or <user>.tar.gz on MME)"
    ),
    mme: str = typer.Option(
        None, "--mme", help="the local MME front, e.g. http://127.0.0.1:8080 (with --target-model)"
    ),
    target_model: str = typer.Option(
        None, "--target-model", help="the MME TargetModel, e.g. alice.tar.gz"
    ),
    endpoint: str = typer.Option(
        None,
        "--endpoint",
        help="a SageMaker multi-model endpoint name, e.g. avatarforge-mme (with --user)",
    ),
    config: Path = typer.Option(
        None, "--config", help="deployment description (with --endpoint): region, models prefix"
    ),
    region: str = typer.Option(None, "--region", help="AWS region (with --endpoint)"),
    negative_prompt: str = typer.Option(None, "--negative-prompt", help="what to avoid"),
    gen_args: str = typer.Option(
        None,
        "--gen-args",
        help='JSON, e.g. \'{"seed": 1, "num_inference_steps": 20}\' (avatarforge contract)',
    ),
    out: Path = typer.Option(
        None,
        help="output folder (default: build/generate/USER or build/generate/TARGET); each image "
        "is a new NN.jpg, an existing file is never overwritten",
    ),
) -> None:
    """Generate images with a served user model; save the server's JPEGs as new files."""
    modes = [bool(url), bool(mme or target_model), bool(endpoint)]
    if sum(modes) != 1:
        fail(f"{TARGETS}, one of them", code=2)
    if endpoint:
        if not user:
            fail(f"--endpoint needs --user ({TARGETS})", code=2)
        _from_endpoint(endpoint, user, prompt, negative_prompt, gen_args, config, region, out)
        return
    if (url and not user) or (mme and not target_model) or (target_model and not mme):
        fail(TARGETS, code=2)
    _check_gen_args(gen_args)
    if url:
        from ..serving.client import generate_jpegs as request

        address, model, name = url, user, user
    else:
        from ..mme.generate import generate_jpegs as request

        address, model, name = mme, target_model, target_model.removesuffix(".tar.gz")
    try:
        jpegs = request(address, model, prompt, negative_prompt, gen_args)
    except OSError as exc:
        fail(f"cannot reach {address}: {exc}")
    save_jpeg_bytes(jpegs, out or build_dir() / "generate" / name)


def _check_gen_args(gen_args: str | None) -> None:
    """A bad field is named here, before a request (and a cold start) is spent on it."""
    from ..generate import GenArgs
    from ..settings import ConfigError

    try:
        GenArgs.parse(gen_args)
    except ConfigError as exc:
        fail(f"--gen-args: {exc}")


def _from_endpoint(
    endpoint: str,
    user: str,
    prompt: str,
    negative_prompt: str | None,
    gen_args: str | None,
    config: Path | None,
    region: str | None,
    out: Path | None,
) -> None:
    from .cloud import endpoint_target

    generate, _ = endpoint_target(endpoint, user, config, region)
    images = generate(prompt, negative_prompt, gen_args)
    save_jpeg_bytes(images, out or build_dir() / "generate" / user)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
