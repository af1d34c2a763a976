"""The `avatarforge` command. Each step of the data's path registers its own commands."""

from __future__ import annotations

import logging

import typer

from . import base, cloud, config, demo, deploy, generate, jobs, mme, preprocess, serve, train

app = typer.Typer(
    name="avatarforge",
    help="Personal avatars from 10-12 selfies: preprocess, train a LoRA on SD 2.1, serve it "
    "from Triton. Every command has --help; generated files go under build/.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


for _module in (base, preprocess, train, serve, generate, mme, jobs, deploy, cloud, demo, config):
    _module.register(app)


def main() -> None:
    app()
