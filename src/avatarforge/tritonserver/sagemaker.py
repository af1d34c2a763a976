"""tritonserver with the SageMaker front end, as a SageMaker MME instance runs it.

:func:`serve_script_args` is what the SageMaker Triton image's ``serve`` script
(docker/sagemaker/serve in triton-inference-server/server; the same lines at v2.51.0, v2.61.0
(25.09) and HEAD) passes to tritonserver in multi-model mode, for a given environment: HTTP,
gRPC and metrics off, model namespacing on, verbose logging unless
``SAGEMAKER_TRITON_LOG_VERBOSE`` says otherwise, the python backend's shared-memory sizes. The
local MME adds the environment the deploy plan gives the model (:data:`MME_ENV`).
:func:`sagemaker_triton` runs exactly that (plus the launcher's backend folder and stop
timeout) with an empty repository — models arrive only through ``POST /models`` — and waits
until ``/ping`` answers; nothing passes locally that needs a port SageMaker does not open. The
SageMaker port binds every interface in 2.51 (no address flag): the launcher's preload library
keeps it on 127.0.0.1, and a server listening beyond loopback is stopped
(:mod:`.launch`, :mod:`.loopback`). A port in use is a
:class:`~avatarforge.tritonserver.launch.PortInUseError`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..netutil import free_port
from ..paths import build_dir
from .launch import check_port_free, start_tritonserver

# What the MME model's environment sets for tritonserver on SageMaker (the deploy plan's
# avatarforge.deploy.mme.mme_environment takes it from here), and so here:
# - /ping "live": the SageMaker front end answers /ping as SAGEMAKER_TRITON_PING_MODE in
#   tritonserver's environment says, default "ready" (src/sagemaker_server.h). The script
#   assigns "live" in MME mode but does not export it, so "ready" applies, unless the variable
#   comes from the container's environment (bash keeps an inherited variable exported when it
#   is reassigned). "ready" is strict readiness: every model READY and, in cores from 2025-12
#   on, every python stub alive; a dead shared base, or one user's failed load (2.51 too),
#   fails the instance's /ping, and SageMaker takes the instance out and may replace it, with
#   every user on it. Our user models repair a dead shared base themselves, so "live" (the
#   server runs) is the health that matches. The override is the script's own knob, set too so
#   that its single-model default cannot win.
# - verbose logs off: the script's default (true) writes ~2 KB per invocation (measured on 2.51
#   through the SageMaker front end: 2072 bytes against 99 at 0; request states and buffers, no
#   input values), paid per GB in CloudWatch, naming the user's model, and buries loads,
#   unloads and errors, which INFO, WARNING and ERROR keep at 0.
# Variables set in this process's environment win, as a model's environment does there.
MME_ENV = {
    "SAGEMAKER_TRITON_PING_MODE": "live",
    "SAGEMAKER_TRITON_OVERRIDE_PING_MODE": "live",
    "SAGEMAKER_TRITON_LOG_VERBOSE": "0",
}
LOG_VERBOSE = MME_ENV["SAGEMAKER_TRITON_LOG_VERBOSE"]

# The serve script's MME lines: (variable, flag, value when the variable is unset or empty), in
# its order (docker/sagemaker/serve at v2.61.0, lines 63-134; the repository is line 44's
# /tmp/sagemaker there). SAGEMAKER_TRITON_MODEL_LOAD_GPU_LIMIT (a flag per GPU, from
# nvidia-smi) is not emulated.
_SCRIPT = (
    ("SAGEMAKER_TRITON_DISABLE_MODEL_NAMESPACING", "--model-namespacing", "true"),
    ("SAGEMAKER_BIND_TO_PORT", "--sagemaker-port", None),
    ("SAGEMAKER_SAFE_PORT_RANGE", "--sagemaker-safe-port-range", None),
    ("SAGEMAKER_TRITON_ALLOW_GRPC", "--allow-grpc", "false"),
    ("SAGEMAKER_TRITON_ALLOW_METRICS", "--allow-metrics", "false"),
    ("SAGEMAKER_TRITON_METRICS_PORT", "--metrics-port", None),
    ("SAGEMAKER_TRITON_GRPC_PORT", "--grpc-port", None),
    ("SAGEMAKER_TRITON_BUFFER_MANAGER_THREAD_COUNT", "--buffer-manager-thread-count", None),
    ("SAGEMAKER_TRITON_THREAD_COUNT", "--sagemaker-thread-count", None),
    ("SAGEMAKER_TRITON_LOG_VERBOSE", "--log-verbose", "true"),
    ("SAGEMAKER_TRITON_LOG_INFO", "--log-info", None),
    ("SAGEMAKER_TRITON_LOG_WARNING", "--log-warning", None),
    ("SAGEMAKER_TRITON_LOG_ERROR", "--log-error", None),
    ("SAGEMAKER_TRITON_SHM_DEFAULT_BYTE_SIZE", "--backend-config=python,shm-default-byte-size",
     "16777216"),
    ("SAGEMAKER_TRITON_SHM_GROWTH_BYTE_SIZE", "--backend-config=python,shm-growth-byte-size",
     "1048576"),
    ("SAGEMAKER_TRITON_TENSORFLOW_VERSION", "--backend-config=tensorflow,version", None),
)  # fmt: skip


def serve_script_args(env: Mapping[str, str], repository: Path | str) -> list[str]:
    """tritonserver's arguments from the serve script in MME mode (SAGEMAKER_MULTI_MODEL=true)
    for the environment ``env``, with ``repository`` for its /tmp/sagemaker."""
    args = [
        "--allow-sagemaker=true",
        "--allow-http=false",
        "--model-control-mode=explicit",
        f"--model-repository={repository}",
    ]
    for variable, flag, default in _SCRIPT:
        if value := env.get(variable) or default:
            args.append(f"{flag}={value}")
    return [*args, *env.get("SAGEMAKER_TRITON_ADDITIONAL_ARGS", "").split()]


def _flag(args: list[str], name: str) -> str | None:
    """The last value of ``--name=`` in ``args`` (tritonserver takes the last)."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return values[-1] if values else None


def _on(args: list[str], name: str) -> bool:
    return (_flag(args, name) or "").lower() in ("true", "on", "1")


@dataclass(frozen=True)
class MMEServer:
    sagemaker_url: str  # Triton's SageMaker front end: /ping, /models, /models/<h>/invoke
    log_path: Path
    start_seconds: float  # until /ping answered
    pid: int  # of tritonserver (its python backend stubs are its children)
    args: tuple[str, ...] = ()  # what the serve script would pass, as passed
    # Triton's own endpoints, off as on SageMaker (SAGEMAKER_TRITON_ALLOW_GRPC and
    # SAGEMAKER_TRITON_ALLOW_METRICS turn them on, here and there); its HTTP is always off
    grpc_url: str | None = None  # host:port
    metrics_url: str | None = None  # http://host:port/metrics


@contextlib.contextmanager
def sagemaker_triton(
    workdir: Path | None = None,
    *,
    sagemaker_port: int | None = None,
    start_timeout: float = 60.0,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[MMEServer]:
    """Run tritonserver with the SageMaker MME front end for the block; always stops it.

    Its flags are the serve script's for this process's environment plus ``extra_env``
    (:func:`serve_script_args`); ``sagemaker_port`` 0 or None: a free one."""
    workdir = Path(workdir or build_dir() / "mme").resolve()
    empty_repo = workdir / "empty-repository"
    empty_repo.mkdir(parents=True, exist_ok=True)
    if sagemaker_port:
        check_port_free(sagemaker_port, "SageMaker", host="0.0.0.0")  # it binds all interfaces
    port = sagemaker_port or free_port()
    env = {
        **MME_ENV,
        **os.environ,
        **(extra_env or {}),
        "SAGEMAKER_MULTI_MODEL": "true",
        "SAGEMAKER_BIND_TO_PORT": str(port),
    }
    args = serve_script_args(env, empty_repo)
    # Triton's defaults where the script names no port (src/command_line_parser.h)
    grpc = int(_flag(args, "--grpc-port") or 8001) if _on(args, "--allow-grpc") else None
    metrics = int(_flag(args, "--metrics-port") or 8002) if _on(args, "--allow-metrics") else None
    started = time.perf_counter()
    with start_tritonserver(
        args,
        {"SageMaker": port, "gRPC": grpc, "metrics": metrics},
        ready_url=f"http://127.0.0.1:{port}/ping",
        env=env,
        log_path=workdir / "tritonserver.log",
        startup_timeout=start_timeout,
    ) as server:
        yield MMEServer(
            f"http://127.0.0.1:{port}",
            server.log_path,
            time.perf_counter() - started,
            server.process.pid,
            tuple(args),
            grpc_url=server.grpc_url,
            metrics_url=server.metrics_url,
        )
