"""AWS without AWS: a real moto server on a loopback port, for tests and local runs.

``with moto_server() as endpoint:`` starts ``moto_server -H 127.0.0.1 -p <free port>`` (the
one installed beside this Python), waits until it answers, yields ``http://127.0.0.1:<port>``
and always stops it. Point boto3 at it with ``AWS_ENDPOINT_URL=<endpoint>`` and dummy
credentials (:func:`dummy_aws_env`); clear its state between tests with :func:`reset`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..netutil import free_port, wait_until_http_ok
from ..subprocesses import die_with_parent

DUMMY_REGION = "us-east-1"


def dummy_aws_env(endpoint: str) -> dict[str, str]:
    """Environment for boto3 against a local endpoint; never real credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": DUMMY_REGION,
        "AWS_REGION": DUMMY_REGION,
    }


def find_moto_server() -> Path:
    """The moto_server script of this environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "moto_server"
    if beside.exists():
        return beside
    found = shutil.which("moto_server")
    if found is None:
        raise FileNotFoundError("moto_server not found (install the 'aws' extra: moto[server])")
    return Path(found)


def reset(endpoint: str) -> None:
    """Clear every resource the moto server holds (POST /moto-api/reset)."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


@contextlib.contextmanager
def environ(values: dict[str, str | None]) -> Iterator[None]:
    """``values`` in ``os.environ`` for the block (None: unset), restored after: boto3 and the
    servers we start read their AWS endpoint and credentials from there."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def moto_server(
    port: int | None = None,
    *,
    start_timeout: float = 30.0,
    log_path: Path | None = None,
    command: Sequence[str] | None = None,
) -> Iterator[str]:
    """Run a moto server on 127.0.0.1 for the duration of the block; yields its endpoint URL.

    ``command``: how to start it (default: this environment's ``moto_server``); it is given
    ``-H 127.0.0.1 -p PORT``.
    """
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(dummy_aws_env(endpoint))
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(log_path, "wb")) if log_path else subprocess.DEVNULL
        process = subprocess.Popen(
            [*(command or [str(find_moto_server())]), "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        try:
            wait_until_http_ok(f"{endpoint}/moto-api/", process, start_timeout, what="moto_server")
            yield endpoint
        finally:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
