"""`avatarforge mme serve|invoke`: the local SageMaker multi-model endpoint."""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import typer

from ..paths import build_dir
from .common import console, fail
from .servers import instance_env, port_in_use, say, stop_on_sigterm, usable_port

FRONT_PORT = 8080  # where a SageMaker container serves invocations: the port people know

mme_app = typer.Typer(
    help="A local SageMaker multi-model endpoint: tritonserver's SageMaker front end + a loader "
    "that fetches <user>.tar.gz on first use and evicts the least recently used.",
    no_args_is_help=True,
)


def _free_port_option(what: str, *, where: str = "127.0.0.1") -> int:
    return typer.Option(0, min=0, max=65535, help=f"{what} port on {where} (0: any free port)")


@mme_app.command("serve")
def serve(
    source: str = typer.Option(
        None, help="folder or s3:// prefix holding <user>.tar.gz (default: build/package)"
    ),
    root: Path = typer.Option(
        None,
        help="where models are untarred, SageMaker's /opt/ml/models; each load url must be "
        "<root>/<name>/model (default: mme.models_root, else build/mme/models)",
    ),
    max_loaded: int = typer.Option(8, min=1, help="models kept loaded (LRU eviction past it)"),
    port: int = typer.Option(
        FRONT_PORT,
        min=0,
        max=65535,
        help="port of the SageMaker-runtime-like front on 127.0.0.1 (0: any free port)",
    ),
    sagemaker_port: int = _free_port_option("tritonserver's SageMaker front end"),
    shared_dir: Path = typer.Option(None, help="shared files (default: build/triton/shared)"),
    base: str = typer.Option("tiny", help="base source for the shared base: 'tiny' or a path"),
) -> None:
    """Start tritonserver (SageMaker front end) + loader + front; Ctrl-C stops everything.

    tritonserver runs with the SageMaker image's flags: its HTTP, gRPC and metrics are off
    (SAGEMAKER_TRITON_ALLOW_GRPC / _ALLOW_METRICS turn the last two on, as there). If
    tritonserver dies, /ping answers 503 and the command exits 1, as a SageMaker container
    whose server died (SageMaker replaces the instance): run it again."""
    from ..mme import MMEConfig, MultiModelLoader
    from ..mme.front import mme_front, process_alive
    from ..tritonserver.launch import PortInUseError
    from ..tritonserver.sagemaker import sagemaker_triton

    options = {
        "MME front": "--port",
        "SageMaker": "--sagemaker-port",
    }
    # all checked before anything starts; 0 stays 0 for tritonserver's ports (it picks them)
    port = usable_port(port, "MME front", options)
    if sagemaker_port:  # Triton 2.51 asks for it on every interface (kept on loopback)
        usable_port(sagemaker_port, "SageMaker", options, host="0.0.0.0")
    stop_on_sigterm()  # models unloaded, tritonserver stopped
    source = source or str(build_dir() / "package")
    env = instance_env(base, shared_dir)  # the user models' ensure-step reads these
    died = ""
    try:
        with sagemaker_triton(sagemaker_port=sagemaker_port, extra_env=env) as server:
            config = MMEConfig(max_loaded=max_loaded, models_root=str(root or ""))
            loader = MultiModelLoader(server.sagemaker_url, source, config=config)

            def alive() -> bool:
                return process_alive(server.pid)

            try:
                with mme_front(loader, port=port, healthy=alive) as url:
                    _print_usage(url, server, source)
                    while alive():
                        time.sleep(0.5)
                # tritonserver died (the OOM killer, a crash): nothing here can serve any more
                died = f"tritonserver died (pid {server.pid}); its log: {server.log_path}"
            finally:
                loader.unload_all(in_triton=alive())
    except KeyboardInterrupt:
        console.print("stopped")
    except PortInUseError as exc:
        port_in_use(exc, options)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:  # the front's port, taken since it was checked
            port_in_use(PortInUseError(port, "MME front"), options)
        fail(str(exc))
    except RuntimeError as exc:
        fail(str(exc))
    if died:
        fail(died)


def _print_usage(url: str, server, source: str) -> None:
    examples = sorted(p.name for p in Path(source).glob("*.tar.gz")) if "://" not in source else []
    target = examples[0] if examples else "USER.tar.gz"
    say(f"local MME ready in {server.start_seconds:.1f} s; log {server.log_path}")
    say(f"  MME front        {url}  (POST /endpoints/<name>/invocations)")
    say(f"  SageMaker front  {server.sagemaker_url}  (tritonserver, on 127.0.0.1)")
    if server.grpc_url:
        say(f"  gRPC             {server.grpc_url}")
    if server.metrics_url:
        say(f"  metrics          {server.metrics_url}  (Prometheus)")
    say(f"TargetModels from {source}: {', '.join(examples) or '(none yet)'}")
    say(
        f"try: avatarforge generate --mme {url} --target-model {target} "
        "--prompt 'a photo of <<TOK>> person' --gen-args '{\"num_inference_steps\": 20}'"
    )
    say(
        f"  or: curl -s -X POST {url}/endpoints/local-mme/invocations "
        f"-H 'X-Amzn-SageMaker-Target-Model: {target}' -H 'Content-Type: application/json' "
        "-d @request.json  (the request format: avatarforge contract)"
    )


@mme_app.command("invoke")
def invoke(
    url: str = typer.Option(..., "--url", help="the local MME front, e.g. http://127.0.0.1:8080"),
    target_model: str = typer.Option(..., "--target-model", help="e.g. alice.tar.gz"),
    payload: Path = typer.Option(..., "--payload", help="KServe v2 JSON request file"),
) -> None:
    """Send a raw KServe v2 JSON request to a TargetModel; print the JSON response."""
    from ..mme.front import invoke_endpoint

    try:
        response = invoke_endpoint(url, target_model, json.loads(payload.read_text()))
    except OSError as exc:
        fail(f"cannot reach {url}: {exc}")
    console.print_json(data=response)


def register(app: typer.Typer) -> None:
    app.add_typer(mme_app, name="mme")
