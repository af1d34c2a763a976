"""tritonserver with the SageMaker front end, as a SageMaker MME instance runs it.

:func:`sagemaker_options` holds what is SageMaker-specific (flags and environment);
:func:`sagemaker_triton` passes them to the project's launcher
(:func:`avatarforge.serving.server.tritonserver`: the real binary from the nvidia-pytriton wheel,
explicit model control, loopback ports, always stopped) with an empty repository — models
arrive only through ``POST /models`` — and waits until ``/ping`` answers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..netutil import free_port, wait_until_http_ok
from ..paths import build_dir


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


@contextlib.contextmanager
def sagemaker_triton(
    workdir: Path | None = None,
    *,
    sagemaker_port: int | None = None,
    start_timeout: float = 60.0,
    extra_env: dict[str, str] | None = None,
) -> Iterator[MMEServer]:
    """Run tritonserver with the SageMaker MME front end for the block; always stops it."""
    from ..serving.server import tritonserver

    workdir = Path(workdir or build_dir() / "mme").resolve()
    empty_repo = workdir / "empty-repository"
    empty_repo.mkdir(parents=True, exist_ok=True)
    options = sagemaker_options(sagemaker_port or free_port())
    started = time.perf_counter()
    with tritonserver(
        [empty_repo],
        env={**options.env, **(extra_env or {})},
        log_path=workdir / "tritonserver.log",
        extra_args=options.args,
        startup_timeout=start_timeout,
    ) as server:
        url = f"http://127.0.0.1:{options.port}"
        wait_until_http_ok(
            f"{url}/ping", server.process, start_timeout, what="tritonserver (SageMaker front end)"
        )
        yield MMEServer(
            url,
            f"http://{server.url}",
            server.log_path,
            time.perf_counter() - started,
            server.process.pid,
        )
