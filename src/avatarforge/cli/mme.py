"""`avatarforge mme serve|invoke`: the local SageMaker multi-model endpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from ..paths import build_dir
from .common import console, fail
from .serve import instance_env, stop_on_sigterm

mme_app = typer.Typer(
    help="A local SageMaker multi-model endpoint: tritonserver's SageMaker front end + a loader "
    "that fetches <user>.tar.gz on first use and evicts the least recently used.",
    no_args_is_help=True,
)


@mme_app.command("serve")
def serve(
    source: str = typer.Option(
        None, help="folder or s3:// prefix holding <user>.tar.gz (default: build/package)"
    ),
    root: Path = typer.Option(None, help="where models are untarred (default: build/mme/models)"),
    max_loaded: int = typer.Option(8, min=1, help="models kept loaded (LRU eviction past it)"),
    port: int = typer.Option(8090, help="port of the SageMaker-runtime-like front (127.0.0.1)"),
    sagemaker_port: int = typer.Option(None, help="tritonserver's SageMaker port (default: free)"),
    shared_dir: Path = typer.Option(None, help="shared files (default: build/triton/shared)"),
    base: str = typer.Option("tiny", help="base source for the shared base: 'tiny' or a path"),
) -> None:
    """Start tritonserver (SageMaker front end) + loader + front; Ctrl-C stops everything."""
    from ..mme import MMEConfig, MultiModelLoader
    from ..mme.front import mme_front
    from ..mme.launch import sagemaker_triton

    stop_on_sigterm()  # models unloaded, tritonserver stopped
    source = source or str(build_dir() / "package")
    env = instance_env(base, shared_dir)  # the user models' ensure-step reads these
    try:
        with sagemaker_triton(sagemaker_port=sagemaker_port, extra_env=env) as server:
            loader = MultiModelLoader(
                server.sagemaker_url,
                source,
                root or build_dir() / "mme" / "models",
                MMEConfig(max_loaded=max_loaded),
            )
            try:
                with mme_front(loader, port=port) as url:
                    _print_usage(url, server, source)
                    while True:
                        time.sleep(1)
            finally:
                loader.unload_all()
    except KeyboardInterrupt:
        console.print("stopped")
    except (OSError, RuntimeError) as exc:
        fail(str(exc))


def _print_usage(url: str, server, source: str) -> None:
    examples = sorted(p.name for p in Path(source).glob("*.tar.gz")) if "://" not in source else []
    target = examples[0] if examples else "USER.tar.gz"
    console.print(
        f"local MME at [bold]{url}[/] (tritonserver SageMaker front end "
        f"{server.sagemaker_url}, ready in {server.start_seconds:.1f} s)"
    )
    console.print(f"TargetModels from {source}: {', '.join(examples) or '(none yet)'}")
    console.print(f"log: {server.log_path}")
    console.print(
        f"try: avatarforge generate --mme {url} --target-model {target} "
        "--prompt 'a photo of <<TOK>> person' --gen-args '{\"steps\": 20}'"
    )
    console.print(
        f"  or: curl -s -X POST {url}/endpoints/local-mme/invocations "
        f"-H 'X-Amzn-SageMaker-Target-Model: {target}' -H 'Content-Type: application/json' "
        "-d @request.json"
    )


@mme_app.command("invoke")
def invoke(
    url: str = typer.Option(..., "--url", help="the local MME front, e.g. http://127.0.0.1:8090"),
    target_model: str = typer.Option(..., "--target-model", help="e.g. alice.tar.gz"),
    payload: Path = typer.Option(..., "--payload", help="KServe v2 JSON request file"),
) -> None:
    """Send a raw KServe v2 JSON request to a TargetModel; print the JSON response."""
    from ..mme.front import EndpointError, invoke_endpoint

    try:
        response = invoke_endpoint(url, target_model, json.loads(payload.read_text()))
    except EndpointError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot reach {url}: {exc}")
    console.print_json(data=response)


def register(app: typer.Typer) -> None:
    app.add_typer(mme_app, name="mme")
