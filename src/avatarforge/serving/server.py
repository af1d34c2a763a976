"""Run the real tritonserver from the nvidia-pytriton wheel on loopback ports, always stopped.

Models run as they would on the stock SageMaker Triton image: a model without
EXECUTION_ENV_PATH gets a bare Python (numpy only; see :func:`avatarforge.envs.bare_env`).

Used by `avatarforge serve local-triton`, the integration tests and the local MME
(:func:`avatarforge.mme.launch.sagemaker_triton`: ``extra_args`` adds the SageMaker front end).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..envs import bare_env
from ..netutil import free_port, wait_until_http_ok
from ..paths import build_dir
from ..subprocesses import die_with_parent
from ..tritonserver import TritonInstall, find_tritonserver

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """tritonserver did not start, or a model did not load; the message quotes its log."""


def backend_dir(install: TritonInstall | None = None) -> Path:
    """backends/python with the stub for this Python (the wheel keeps stubs apart)."""
    install = install or find_tritonserver()
    python = build_dir() / "triton" / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for target in (
        install.python_backend / "libtriton_python.so",
        install.python_backend / "triton_python_backend_utils.py",
        install.stub,
    ):
        link = python / target.name
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        tmp = python / f".{target.name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)  # atomic: parallel starts never see a missing file
    return python.parent


@dataclass
class RunningServer:
    url: str  # host:port of the HTTP (KServe v2) endpoint, as tritonclient wants it
    process: subprocess.Popen
    log_path: Path
    started_s: float  # seconds until the server answered ready

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


@contextlib.contextmanager
def tritonserver(
    repositories: Sequence[Path],
    *,
    load: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 120.0,
) -> Iterator[RunningServer]:
    """Start tritonserver (explicit model control), load ``load``, yield, then stop it."""
    install = find_tritonserver()
    port = free_port()
    log_path = log_path or build_dir() / "triton" / f"tritonserver-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(install.binary),
        *(f"--model-repository={Path(r).resolve()}" for r in repositories),
        f"--backend-directory={backend_dir(install)}",
        "--model-control-mode=explicit",
        "--http-address=127.0.0.1",
        f"--http-port={port}",
        "--allow-grpc=false",
        "--allow-metrics=false",
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
    server = RunningServer(f"127.0.0.1:{port}", process, log_path, 0.0)
    try:
        live = f"http://{server.url}/v2/health/live"
        try:
            wait_until_http_ok(live, process, startup_timeout, what="tritonserver")
        except (RuntimeError, TimeoutError) as exc:
            raise ServerError(f"{exc}:\n{server.log_tail()}") from None
        for model in load:
            server.load(model)
        server.started_s = time.monotonic() - t0
        yield server
    finally:
        _stop(process)
