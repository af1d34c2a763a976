"""Run the real tritonserver from the nvidia-pytriton wheel on loopback ports, always stopped.

Models run as they would on the stock SageMaker Triton image: a model without
EXECUTION_ENV_PATH gets a bare Python (numpy only; see :func:`avatarforge.envs.bare_env`).
HTTP, and where asked gRPC and Prometheus metrics, listen on 127.0.0.1 only; a port that is
taken is a :class:`PortInUseError` naming it, before the server starts.

Used by `avatarforge serve local-triton`, the integration tests and the local MME
(:func:`.sagemaker.sagemaker_triton`: ``extra_args`` adds the SageMaker front end).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..envs import bare_env
from ..errors import AvatarforgeError
from ..netutil import free_port, wait_until_http_ok
from ..paths import build_dir
from ..subprocesses import die_with_parent
from .install import backend_dir, find_tritonserver

log = logging.getLogger(__name__)


LOOPBACK = "127.0.0.1"


class ServerError(AvatarforgeError, RuntimeError):
    """tritonserver did not start, or a model did not load; the message quotes its log."""


class PortInUseError(ServerError):
    """A port the server must listen on is taken; ``what`` says which one (HTTP, gRPC, ...)."""

    status = 409

    def __init__(self, port: int, what: str, host: str = LOOPBACK) -> None:
        super().__init__(f"port {port} ({what}) is already in use on {host}")
        self.port, self.what, self.host = port, what, host


def check_port_free(port: int, what: str, host: str = LOOPBACK) -> None:
    """Raise :class:`PortInUseError` if ``host:port`` cannot be listened on now.

    SO_REUSEADDR as servers set it: a port left in TIME_WAIT by a stopped server counts as
    free, one that something listens on does not (also when it listens on all interfaces)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(port, what, host) from None
            raise ServerError(f"cannot listen on {host}:{port} ({what}): {exc.strerror}") from None


@dataclass
class RunningServer:
    url: str  # host:port of the HTTP (KServe v2) endpoint, as tritonclient wants it
    process: subprocess.Popen
    log_path: Path
    started_s: float  # seconds until the server answered ready
    grpc_url: str | None = None  # host:port of the gRPC endpoint; None: off
    metrics_url: str | None = None  # http://host:port/metrics (Prometheus text); None: off

    def client(self, network_timeout: float = 600.0):
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(self.url, network_timeout=network_timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def load(self, model: str) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            self.client().load_model(model)
        except InferenceServerException as exc:
            raise ServerError(f"loading {model!r} failed: {exc}\n{self.log_tail()}") from None


def _stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("tritonserver did not stop in %.0f s; killing it", timeout)
    # The server ran in its own session: this ends it and any stub it left behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _port(port: int | None, what: str) -> int | None:
    """None: off; 0: a free port now; else the port, checked free."""
    if port is None:
        return None
    if port == 0:
        return free_port()
    check_port_free(port, what)
    return port


@contextlib.contextmanager
def tritonserver(
    repositories: Sequence[Path],
    *,
    load: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 120.0,
    http_port: int = 0,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
) -> Iterator[RunningServer]:
    """Start tritonserver (explicit model control), load ``load``, yield, then stop it.

    Ports, all on 127.0.0.1: 0 picks a free one; gRPC and metrics are off unless given. A port
    in use is a :class:`PortInUseError` before anything starts."""
    install = find_tritonserver()
    port = _port(http_port, "HTTP")
    grpc = _port(grpc_port, "gRPC")
    metrics = _port(metrics_port, "metrics")
    log_path = log_path or build_dir() / "triton" / f"tritonserver-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(install.binary),
        *(f"--model-repository={Path(r).resolve()}" for r in repositories),
        f"--backend-directory={backend_dir(install)}",
        "--model-control-mode=explicit",
        f"--http-address={LOOPBACK}",
        f"--http-port={port}",
        *(
            ["--allow-grpc=true", f"--grpc-address={LOOPBACK}", f"--grpc-port={grpc}"]
            if grpc is not None
            else ["--allow-grpc=false"]
        ),
        *(
            ["--allow-metrics=true", f"--metrics-address={LOOPBACK}", f"--metrics-port={metrics}"]
            if metrics is not None
            else ["--allow-metrics=false"]
        ),
        "--exit-timeout-secs=10",
        *extra_args,
    ]
    proc_env = {**os.environ, **(env or {})}
    proc_env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(install.libs), proc_env.get("LD_LIBRARY_PATH", "")) if p
    )
    # Models without EXECUTION_ENV_PATH (every user model) get a Python like the SageMaker
    # Triton image's default one: the stub takes the first python3 on PATH, which has numpy
    # and nothing else. What works here then works on the stock image.
    proc_env["PATH"] = os.pathsep.join((str(bare_env() / "bin"), proc_env.get("PATH", "")))
    t0 = time.monotonic()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=proc_env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    server = RunningServer(
        f"{LOOPBACK}:{port}",
        process,
        log_path,
        0.0,
        grpc_url=f"{LOOPBACK}:{grpc}" if grpc is not None else None,
        metrics_url=f"http://{LOOPBACK}:{metrics}/metrics" if metrics is not None else None,
    )
    try:
        live = f"http://{server.url}/v2/health/live"
        try:
            wait_until_http_ok(live, process, startup_timeout, what="tritonserver")
        except (RuntimeError, TimeoutError) as exc:
            raise listener_error(server, {"HTTP": port, "gRPC": grpc, "metrics": metrics}) or (
                ServerError(f"{exc}:\n{server.log_tail()}")
            ) from None
        if metrics is not None and (error := listener_error(server, {"metrics": metrics})):
            raise error  # the server runs on without it: a silent gap in monitoring
        for model in load:
            server.load(model)
        server.started_s = time.monotonic() - t0
        yield server
    finally:
        _stop(process)


# tritonserver 2.51, e.g.: failed to start GRPC service: Unavailable - Socket '127.0.0.1:8001'
# already in use. HTTP and gRPC then exit; the metrics service fails alone and the server runs on.
_FAILED_RE = re.compile(r"failed to start (\w+) service: (.*?)\"?$", re.M)
_BUSY_RE = re.compile(r"Socket '[^']*:(\d+)' already in use")


def listener_error(server: RunningServer, ports: dict[str, int | None]) -> ServerError | None:
    """Why a listener of the server failed to start, from its log (e.g. another process took a
    port between our check and the server's bind); None if none did."""
    failed = _FAILED_RE.findall(server.log_path.read_text(errors="replace"))
    for service, message in failed:
        busy = _BUSY_RE.search(message)
        for what, port in ports.items():
            if busy and port == int(busy.group(1)):
                return PortInUseError(port, what)
        return ServerError(f"tritonserver could not start its {service} service: {message}")
    return None
