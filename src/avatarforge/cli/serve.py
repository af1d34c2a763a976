"""`avatarforge package`, `avatarforge serve local-triton|load` and `avatarforge contract`."""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path

import typer

from ..paths import build_dir
from ..serving.config import INSTANCE_FIELDS, ServingConfig
from .common import config_options, console, fail
from .servers import instance_env, port_in_use, say, stop_on_sigterm, usable_port

serve_app = typer.Typer(help="Serve packaged users from tritonserver.", no_args_is_help=True)


# a package sets its rows per request only; the shared base's settings are the instance's
# (AVATARFORGE_SERVING_<FIELD>), so no package sets them for every user
@config_options(ServingConfig, skip=INSTANCE_FIELDS)
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
    from ..adapter import base_config_for, read_adapter
    from ..base.config import BaseConfig, resolve_base
    from ..serving.package import package_user

    adapter = adapter or build_dir() / "users" / user / "adapter"
    serving = ServingConfig(**options)
    meta = read_adapter(adapter)
    info = resolve_base(BaseConfig(base=base) if base else base_config_for(meta))
    path = package_user(user, adapter, out, base=info, serving=serving)
    console.print(f"{path} ({path.stat().st_size / 1024:.1f} KiB)")


# What people know: tritonserver's own defaults (and the NVIDIA containers' published ports).
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002


def _port_option(default: int, what: str) -> int:
    return typer.Option(
        default, min=0, max=65535, help=f"{what} port on 127.0.0.1 (0: any free port)"
    )


@serve_app.command("local-triton")
def local_triton(
    users: list[str] = typer.Option(
        None, "--users", help="users to load (packaged in --source) (default: all packaged)"
    ),
    source: Path = typer.Option(
        None, "--source", help="folder holding <user>.tar.gz (default: build/package)"
    ),
    port: int = _port_option(HTTP_PORT, "HTTP (KServe v2)"),
    grpc_port: int = _port_option(GRPC_PORT, "gRPC"),
    metrics_port: int = _port_option(METRICS_PORT, "Prometheus metrics"),
    base: str = typer.Option("tiny", help="the base source: 'tiny', a diffusers folder or tarball"),
    shared_dir: Path = typer.Option(None, help="shared files (default: build/triton/shared)"),
) -> None:
    """Start tritonserver on model_setup + the packaged users (HTTP, gRPC and metrics on
    127.0.0.1); `avatarforge serve load USER` adds a user while it runs; Ctrl-C stops."""
    from ..serving.repository import build_repository
    from ..tritonserver.launch import PortInUseError, tritonserver

    options = {"HTTP": "--port", "gRPC": "--grpc-port", "metrics": "--metrics-port"}
    port = usable_port(port, "HTTP", options)  # checked before anything is built or started
    grpc_port = usable_port(grpc_port, "gRPC", options)
    metrics_port = usable_port(metrics_port, "metrics", options)
    source = source or build_dir() / "package"
    packages = sorted(source.glob("*.tar.gz"))
    if users:
        packages = [source / f"{u}.tar.gz" for u in users]
        if missing := [p for p in packages if not p.is_file()]:
            fail(f"not packaged: {', '.join(map(str, missing))} (run make package USER=...)")
    env = instance_env(base, shared_dir)
    repo = repository_for(port)
    names = build_repository(repo, packages)
    stop_on_sigterm()
    try:
        with tritonserver(
            [repo],
            load=["model_setup", *names],
            env=env,
            http_port=port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
        ) as server:
            _print_urls(server, names, repo, port)
            while server.process.poll() is None:
                time.sleep(0.5)
            fail(f"tritonserver exited ({server.process.returncode}); see {server.log_path}")
    except KeyboardInterrupt:
        console.print("stopped")
    except PortInUseError as exc:
        port_in_use(exc, options)


def _print_urls(server, names: list[str], repo: Path, port: int) -> None:
    from ..tritonserver.control_key import HEADER, key_file

    say(f"tritonserver ready in {server.started_s:.1f} s; log {server.log_path}")
    say(f"  HTTP     http://{server.url}  (KServe v2: POST /v2/models/<user>/infer)")
    say(f"  gRPC     {server.grpc_url}")
    say(f"  metrics  {server.metrics_url}  (Prometheus)")
    say(f"models: {', '.join(['model_setup', *names])} (repository {repo})")
    example = names[0] if names else "USER"
    say(
        f"try: avatarforge generate --url {server.url} --user {example} "
        "--prompt 'a photo of <<TOK>> person' --gen-args '{\"seed\": 1}'"
    )
    say(f"add a newly packaged user: avatarforge serve load USER --url {server.url}")
    say(
        "the APIs that change the server (repository, shared memory, trace, logging) take "
        f"the header {HEADER} with the key in {key_file(port)} (this user only)"
    )
    say("the request format: avatarforge contract")


def repository_for(port: int) -> Path:
    """The repository local-triton serves on HTTP ``port`` (one per port: two servers never
    share one, and `serve load` finds it from the URL)."""
    return build_dir() / "triton" / f"repository-{port}"


@serve_app.command("load")
def load(
    user: str = typer.Argument(..., help="the user: <source>/<user>.tar.gz is loaded"),
    url: str = typer.Option(
        f"127.0.0.1:{HTTP_PORT}", "--url", help="the running local-triton's HTTP address"
    ),
    source: Path = typer.Option(
        None, "--source", help="folder holding <user>.tar.gz (default: build/package)"
    ),
    repository: Path = typer.Option(
        None,
        "--repository",
        help="the server's model repository (default: the one local-triton made for the "
        "port of --url, build/triton/repository-PORT)",
    ),
) -> None:
    """Load a newly packaged user into a running local-triton, without a restart (a package
    made again replaces the loaded one)."""
    from ..names import check_user_id
    from ..serving.repository import load_package
    from ..tritonserver.control_key import read_key

    check_user_id(user)
    package = (source or build_dir() / "package") / f"{user}.tar.gz"
    if not package.is_file():
        fail(f"no package {package} (run make package USER={user})")
    port = urllib.parse.urlsplit("//" + url.removeprefix("http://")).port
    if port is None:
        fail(f"--url {url}: give host:port")
    repository = repository or repository_for(port)
    started = time.monotonic()
    try:
        name = load_package(url, repository, package, control_key=read_key(port))
    except OSError as exc:
        fail(str(exc))
    took = time.monotonic() - started
    console.print(f"loaded {name} on {url} in {took:.1f} s (from {package})", soft_wrap=True)


def contract(
    markdown: bool = typer.Option(False, help="print Markdown (as in docs/request.md)"),
) -> None:
    """The request a served user model takes: inputs, datatypes, shapes, gen_args fields and
    their bounds, a curl and a tritonclient example."""
    from rich.markdown import Markdown

    from ..serving.schema import contract_markdown

    if markdown:
        print(contract_markdown())
    else:
        console.print(Markdown(contract_markdown()))


def register(app: typer.Typer) -> None:
    """Add this step's commands to the root app."""
    app.command("package")(package)
    app.add_typer(serve_app, name="serve")
    app.command("contract")(contract)
