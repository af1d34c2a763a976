"""Run the real tritonserver from the nvidia-pytriton wheel on loopback ports, always stopped.

Models run as they would on the stock SageMaker Triton image: a model without
EXECUTION_ENV_PATH gets a bare Python (numpy only; see :func:`avatarforge.envs.bare_env`).
HTTP, and where asked gRPC and Prometheus metrics, listen on 127.0.0.1 only; a port that is
taken is a :class:`PortInUseError` naming it, before the server starts. The APIs that change
the server (load a model, ...) need the server's control key (:mod:`.control_key`), and a
server that would listen beyond loopback is stopped (:mod:`.loopback`).

Used by `avatarforge serve local-triton` and the integration tests (:func:`tritonserver`), and
by the local MME (:func:`.sagemaker.sagemaker_triton`, through :func:`start_tritonserver` with
the SageMaker image's flags).
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
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..envs import bare_env
from ..errors import AvatarforgeError
from ..netutil import free_port, wait_until_http_ok
from ..paths import build_dir
from ..subprocesses import die_with_parent
from .control_key import headers, key_file, new_key, restrict_args, write_key
from .install import backend_dir, find_tritonserver
from .loopback import (
    ALLOW_EXPOSED_ENV,
    KEY_ENV,
    PLACEHOLDER,
    LoopbackError,
    beyond_loopback,
    exposure_allowed,
    listening,
    preload_library,
)

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
    url: str | None  # host:port of the HTTP (KServe v2) endpoint, as tritonclient wants it
    process: subprocess.Popen
    log_path: Path
    started_s: float  # seconds until the server answered ready
    grpc_url: str | None = None  # host:port of the gRPC endpoint; None: off
    metrics_url: str | None = None  # http://host:port/metrics (Prometheus text); None: off
    # opens the APIs that change the server (see .control_key); None: HTTP and gRPC are off
    control_key: str | None = field(default=None, repr=False)

    def client(self, network_timeout: float = 600.0):
        import tritonclient.http as httpclient

        if self.url is None:
            raise ServerError("this tritonserver has no HTTP endpoint")
        return httpclient.InferenceServerClient(self.url, network_timeout=network_timeout)

    def control_headers(self) -> dict[str, str]:
        """HTTP headers of a request to an API that changes the server (load, unload, ...)."""
        return headers(self.control_key) if self.control_key else {}

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def load(self, model: str) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            self.client().load_model(model, headers=self.control_headers())
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
    port = _port(http_port, "HTTP")
    grpc = _port(grpc_port, "gRPC")
    metrics = _port(metrics_port, "metrics")
    args = [
        *(f"--model-repository={Path(r).resolve()}" for r in repositories),
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
        *extra_args,
    ]
    with start_tritonserver(
        args,
        {"HTTP": port, "gRPC": grpc, "metrics": metrics},
        ready_url=f"http://{LOOPBACK}:{port}/v2/health/live",
        env=env,
        log_path=log_path or build_dir() / "triton" / f"tritonserver-{port}.log",
        startup_timeout=startup_timeout,
    ) as server:
        loading = time.monotonic()
        for model in load:
            server.load(model)
        server.started_s += time.monotonic() - loading
        yield server


@contextlib.contextmanager
def start_tritonserver(
    args: Sequence[str],
    ports: Mapping[str, int | None],
    *,
    ready_url: str,
    env: Mapping[str, str] | None = None,
    log_path: Path,
    startup_timeout: float = 120.0,
) -> Iterator[RunningServer]:
    """Run tritonserver with ``args`` until ``ready_url`` answers 200; yield; always stop it.

    ``ports`` names what listens where (None: off; "HTTP" and "gRPC" get the control key). The
    server is kept to this user: its APIs that change it need a new control key (written 0600
    for our CLI while it runs, see :mod:`.control_key`), it starts with the preload library
    (:mod:`.loopback`), and once ready it must listen on loopback only. What would leave it
    open (no working library, an address beyond loopback) stops it with a :class:`ServerError`,
    unless ``AVATARFORGE_ALLOW_EXPOSED_TRITON=1`` (then a warning says what is open).

    Added to ``args``: the python backend laid out for this Python, a bounded stop (requests in
    flight get 10 s, then SIGKILL at 30 s) and the control key's flags."""
    install = find_tritonserver()
    http, grpc = ports.get("HTTP"), ports.get("gRPC")
    key = new_key() if http is not None or grpc is not None else None
    preload = _preload_env(key)
    cmd = [
        str(install.binary),
        *args,
        f"--backend-directory={backend_dir(install)}",
        "--exit-timeout-secs=10",
    ]
    if key:  # the library puts the key in the placeholder's place, off the command line
        value = PLACEHOLDER if KEY_ENV in preload else key
        cmd += restrict_args(value, grpc=grpc is not None)
    proc_env = {**os.environ, **(env or {}), **preload}
    proc_env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(install.libs), proc_env.get("LD_LIBRARY_PATH", "")) if p
    )
    # Models without EXECUTION_ENV_PATH (every user model) get a Python like the SageMaker
    # Triton image's default one: the stub takes the first python3 on PATH, which has numpy
    # and nothing else. What works here then works on the stock image.
    proc_env["PATH"] = os.pathsep.join((str(bare_env() / "bin"), proc_env.get("PATH", "")))
    log_path.parent.mkdir(parents=True, exist_ok=True)
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
        f"{LOOPBACK}:{http}" if http is not None else None,
        process,
        log_path,
        0.0,
        grpc_url=f"{LOOPBACK}:{grpc}" if grpc is not None else None,
        metrics_url=f"http://{LOOPBACK}:{ports['metrics']}/metrics"
        if ports.get("metrics") is not None
        else None,
        control_key=key,
    )
    key_path = key_file(http) if key and http is not None else None
    try:
        try:
            wait_until_http_ok(ready_url, process, startup_timeout, what="tritonserver")
        except (RuntimeError, TimeoutError) as exc:
            raise listener_error(server, ports) or (
                ServerError(f"{exc}:\n{server.log_tail()}")
            ) from None
        server.started_s = time.monotonic() - t0
        if ports.get("metrics") is not None and (
            error := listener_error(server, {"metrics": ports["metrics"]})
        ):
            raise error  # the server runs on without it: a silent gap in monitoring
        _check_private(server, ports)
        if key_path:
            write_key(key_path, key)
        yield server
    finally:
        _stop(process)
        if key_path and key_path.is_file() and key_path.read_text() == key:
            key_path.unlink()  # (a server started since on this port wrote its own)


def _preload_env(key: str | None) -> dict[str, str]:
    """LD_PRELOAD (and the key for the library to put in place), or nothing if the library
    cannot be had and the operator allowed that."""
    try:
        library = preload_library()
    except LoopbackError as exc:
        if not exposure_allowed():
            raise ServerError(
                f"{exc}: without it tritonserver's any-address listeners are open to the "
                "network and its control key is on its command line. Install a C compiler "
                f"(cc), or set {ALLOW_EXPOSED_ENV}=1 to run it like that"
            ) from None
        log.warning("%s: %s=1, so tritonserver starts without it: its any-address listeners "
                    "are open to the network and its control key is on its command line "
                    "(/proc/PID/cmdline)", exc, ALLOW_EXPOSED_ENV)  # fmt: skip
        return {}
    return {"LD_PRELOAD": str(library), **({KEY_ENV: key} if key else {})}


def _check_private(server: RunningServer, ports: Mapping[str, int | None]) -> None:
    """ServerError unless every listener of the server is on loopback (after waiting up to 5 s
    for each port in ``ports`` to listen: metrics starts last) and, with HTTP on, its
    restricted APIs refuse a request without the key and take one with it."""
    pid, expected = server.process.pid, {p for p in ports.values() if p is not None}
    deadline = time.monotonic() + 5.0
    while not expected <= {port for _, port in listening(pid)} and time.monotonic() < deadline:
        time.sleep(0.05)
    if exposed := beyond_loopback(listening(pid)):
        message = f"tritonserver listens beyond loopback: {', '.join(exposed)}"
        if not exposure_allowed():
            raise ServerError(f"{message}; stopped it ({ALLOW_EXPOSED_ENV}=1 allows it)")
        log.warning("%s (%s=1): anyone who reaches it can use it", message, ALLOW_EXPOSED_ENV)
    if server.url and server.control_key:
        index = f"http://{server.url}/v2/repository/index"
        refused = _status(index, {})
        opened = _status(index, server.control_headers())
        if (refused, opened) != (403, 200):
            raise ServerError(
                f"tritonserver's repository API answered {refused} without the control key "
                f"and {opened} with it (expected 403 and 200); stopped it"
            )


def _status(url: str, request_headers: Mapping[str, str]) -> int:
    request = urllib.request.Request(url, data=b"", method="POST", headers=dict(request_headers))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


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
