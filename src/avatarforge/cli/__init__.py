"""The `avatarforge` command. Each step of the data's path registers its own commands."""

from __future__ import annotations

import logging

import typer

from .. import __version__
from ..cpu_threads import quiet_cpu_threads
from . import (
    api,
    avatars,
    base,
    cloud,
    config,
    demo,
    deploy,
    export,
    forget,
    generate,
    jobs,
    mme,
    preprocess,
    serve,
    train,
)
from . import eval as eval_
from .common import Commands

app = typer.Typer(
    name="avatarforge",
    help="Personal avatars from 10-12 selfies: preprocess, train a LoRA on SD 2.1, serve it "
    "from Triton. Every command has --help; generated files go under build/.",
    cls=Commands,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    # Help as click writes it: option names are never cut (rich's tables cut them with "…" to
    # fit 80 columns: "--gradient-accum…"); lines use the terminal's width, up to 120.
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)


def _version(value: bool) -> None:
    if value:
        print(f"avatarforge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:  # "Found credentials in environment variables." once per client made
        for name in ("botocore", "boto3", "s3transfer"):
            logging.getLogger(name).setLevel(logging.WARNING)


for _module in (
    base,
    preprocess,
    train,
    serve,
    generate,
    export,
    forget,
    eval_,
    avatars,
    mme,
    jobs,
    deploy,
    cloud,
    demo,
    api,
    config,
):
    _module.register(app)


def main() -> None:
    quiet_cpu_threads()  # before any command loads torch (training, diffusers, the demos)
    app()
