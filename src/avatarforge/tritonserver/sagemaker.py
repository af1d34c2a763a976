"""tritonserver with the SageMaker front end, as a SageMaker MME instance runs it.

:func:`sagemaker_options` holds what is SageMaker-specific (flags and environment);
:func:`sagemaker_triton` passes them to the project's launcher
(:func:`.launch.tritonserver`: the real binary from the nvidia-pytriton wheel,
explicit model control, loopback ports, always stopped) with an empty repository — models
arrive only through ``POST /models`` — and waits until ``/ping`` answers. Triton's own HTTP,
gRPC and metrics listen on 127.0.0.1; the SageMaker port on every interface (2.51 has no
address flag for it). A port in use is a :class:`~avatarforge.tritonserver.launch.PortInUseError`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..netutil import free_port, wait_until_http_ok
from ..paths import build_dir
from .launch import ServerError, check_port_free, listener_error, tritonserver
from .loopback import loopback_env


@dataclass(frozen=True)
class SageMakerOptions:
    """Flags and environment that turn on the SageMaker multi-model front end.

    The launcher must also use ``--model-control-mode=explicit``: SageMaker (here, the loader)
    decides what is loaded.
    """

    port: int
    args: tuple[str, ...] = field(default=())
    env: dict[str, str] = field(default_factory=dict)


def sagemaker_options(port: int) -> SageMakerOptions:
    """What the SageMaker Triton image's ``serve`` script passes for a multi-model endpoint
    (docker/sagemaker/serve in triton-inference-server/server), so models that work here work
    there: model namespacing on, and the python backend's shared-memory sizes."""
    # tritonserver 2.51 has no --sagemaker-address: this front end listens on every interface.
    return SageMakerOptions(
        port=port,
        args=(
            "--allow-sagemaker=true",
            f"--sagemaker-port={port}",
            "--model-namespacing=true",
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=1048576",
        ),
        env={"SAGEMAKER_MULTI_MODEL": "true"},
    )


@dataclass(frozen=True)
class MMEServer:
    sagemaker_url: str  # Triton's SageMaker front end: /ping, /models, /models/<h>/invoke
    http_url: str  # Triton's KServe v2 HTTP endpoint (health, metadata)
    log_path: Path
    start_seconds: float  # until /ping answered
    pid: int  # of tritonserver (its python backend stubs are its children)
    grpc_url: str | None = None  # host:port of Triton's gRPC endpoint; None: off
    metrics_url: str | None = None  # Triton's Prometheus metrics; None: off


@contextlib.contextmanager
def sagemaker_triton(
    workdir: Path | None = None,
    *,
    sagemaker_port: int | None = None,
    start_timeout: float = 60.0,
    extra_env: dict[str, str] | None = None,
    http_port: int = 0,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
) -> Iterator[MMEServer]:
    """Run tritonserver with the SageMaker MME front end for the block; always stops it.

    Ports as :func:`~avatarforge.tritonserver.launch.tritonserver` takes them (0 or None for the
    SageMaker port: a free one)."""
    workdir = Path(workdir or build_dir() / "mme").resolve()
    empty_repo = workdir / "empty-repository"
    empty_repo.mkdir(parents=True, exist_ok=True)
    if sagemaker_port:
        check_port_free(sagemaker_port, "SageMaker", host="0.0.0.0")  # it binds all interfaces
    options = sagemaker_options(sagemaker_port or free_port())
    started = time.perf_counter()
    with tritonserver(
        [empty_repo],
        env={**options.env, **loopback_env(), **(extra_env or {})},  # SageMaker port: loopback
        log_path=workdir / "tritonserver.log",
        extra_args=options.args,
        startup_timeout=start_timeout,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
    ) as server:
        url = f"http://127.0.0.1:{options.port}"
        try:
            wait_until_http_ok(
                f"{url}/ping",
                server.process,
                start_timeout,
                what="tritonserver (SageMaker front end)",
            )
        except (RuntimeError, TimeoutError) as exc:
            raise listener_error(server, {"SageMaker": options.port}) or ServerError(
                f"{exc}:\n{server.log_tail()}"
            ) from None
        yield MMEServer(
            url,
            f"http://{server.url}",
            server.log_path,
            time.perf_counter() - started,
            server.process.pid,
            grpc_url=server.grpc_url,
            metrics_url=server.metrics_url,
        )
