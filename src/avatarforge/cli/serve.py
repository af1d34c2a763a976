"""`avatarforge package` and `avatarforge serve local-triton`."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import typer

from ..paths import build_dir
from ..serving.config import ServingConfig
from .common import config_options, console, fail

serve_app = typer.Typer(help="Serve packaged users from tritonserver.", no_args_is_help=True)


@config_options(ServingConfig)
def package(
    user: str = typer.Option(..., "--user", help="user name: the Triton model name"),
    adapter: Path = typer.Option(
        None, "--adapter", help="adapter folder (default: build/users/USER/adapter)"
    ),
    out: Path = typer.Option(None, help="output folder (default: build/package)"),
    base: str = typer.Option("", help="the serving base, if not where the adapter says"),
    **options,
) -> None:
    """Package a user's adapter as a Triton model tarball (the SageMaker MME layout).

    It holds no machine paths: the serving instance says where its shared files are.
    """
    from ..adapter import AdapterError, base_config_for, read_adapter
    from ..base import BaseConfig, BaseError, resolve_base
    from ..serving.package import PackageError, package_user
    from ..settings import ConfigError

    adapter = adapter or build_dir() / "users" / user / "adapter"
    try:
        serving = ServingConfig(**options)
        meta = read_adapter(adapter)
        info = resolve_base(BaseConfig(base=base) if base else base_config_for(meta))
        path = package_user(user, adapter, out, base=info, serving=serving)
    except (AdapterError, BaseError, ConfigError, PackageError) as exc:
        fail(str(exc))
    console.print(f"{path} ({path.stat().st_size / 1024:.1f} KiB)")


@serve_app.command("local-triton")
def local_triton(
    users: list[str] = typer.Option(
        None, "--users", help="users to load (packaged in build/package) (default: all packaged)"
    ),
    base: str = typer.Option("tiny", help="the base source: 'tiny', a diffusers folder or tarball"),
    shared_dir: Path = typer.Option(None, help="shared files (default: build/triton/shared)"),
) -> None:
    """Start tritonserver on the repository: model_setup + the packaged users; Ctrl-C stops."""
    from ..serving.repository import build_repository
    from ..serving.server import ServerError, tritonserver

    packages = sorted((build_dir() / "package").glob("*.tar.gz"))
    if users:
        packages = [build_dir() / "package" / f"{u}.tar.gz" for u in users]
        if missing := [p for p in packages if not p.is_file()]:
            fail(f"not packaged: {', '.join(map(str, missing))} (run make package USER=...)")
    env = instance_env(base, shared_dir)
    repo = build_dir() / "triton" / "repository"
    names = build_repository(repo, packages)
    stop_on_sigterm()
    try:
        with tritonserver([repo], load=["model_setup", *names], env=env) as server:
            took = f"{server.started_s:.1f} s"
            console.print(f"tritonserver at [bold]http://{server.url}[/] (ready in {took})")
            console.print(f"models: {', '.join(['model_setup', *names])}; log {server.log_path}")
            example = names[0] if names else "USER"
            console.print(
                f"try: avatarforge generate --url {server.url} --user {example} "
                "--prompt 'a photo of <<TOK>> person' --gen-args '{\"steps\": 20}'"
            )
            while server.process.poll() is None:
                time.sleep(0.5)
            fail(f"tritonserver exited ({server.process.returncode}); see {server.log_path}")
    except KeyboardInterrupt:
        console.print("stopped")
    except ServerError as exc:
        fail(str(exc))


def instance_env(base: str, shared_dir: Path | None) -> dict[str, str]:
    """The server environment the models' ensure-step reads: shared files, base source, and
    this interpreter's environment as the shared base's serving env."""
    from ..base import BaseConfig, BaseError, resolve_base
    from ..serving.config import local_instance_env

    try:  # a folder or tarball is used as is: the ensure-step verifies the hash
        source = str(resolve_base(BaseConfig()).path) if base == "tiny" else base
    except BaseError as exc:
        fail(str(exc))
    return local_instance_env(source, shared_dir or build_dir() / "triton" / "shared")


def stop_on_sigterm() -> None:
    """SIGTERM (kill, a supervisor) unwinds like Ctrl-C, so the servers are always stopped."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def register(app: typer.Typer) -> None:
    """Add this step's commands to the root app."""
    app.command("package")(package)
    app.add_typer(serve_app, name="serve")
