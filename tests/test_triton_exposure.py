"""What another process, another machine or a web page can do to a tritonserver we start.

- The APIs that change the server need its control key (tritonserver's restricted APIs): a
  process without it cannot load code through the repository API, neither with a JSON body
  nor as a web page would send it (text/plain, a foreign Origin: no CORS preflight). The key is
  in a 0600 file, on no command line, and in no python stub's environment; a model's own
  ``pb_utils.load_model`` (the shared base's start) needs no key.
- The preload library is checked before use: a corrupted cached copy is rebuilt, and with no
  way to build one the server does not start. A server listening beyond loopback is stopped.
- The local MME runs tritonserver with exactly the flags of the SageMaker image's serve script
  (vendored: sagemaker_serve/serve) and listens on nothing but the SageMaker port.

Servers here hold tiny python models (no SD pipeline): each starts in about a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
import urllib.request
from importlib import resources
from pathlib import Path

import pytest

from avatarforge.paths import build_dir
from avatarforge.tritonserver.control_key import (
    ControlKeyError,
    grpc_headers,
    key_file,
    read_key,
    write_key,
)
from avatarforge.tritonserver.launch import ServerError, tritonserver
from avatarforge.tritonserver.loopback import (
    ALLOW_EXPOSED_ENV,
    KEY_ENV,
    beyond_loopback,
    listening,
    preload_library,
)
from avatarforge.tritonserver.sagemaker import (
    LOG_VERBOSE,
    MME_ENV,
    sagemaker_triton,
    serve_script_args,
)

# docker/sagemaker/serve of triton-inference-server/server at v2.61.0 (= HEAD), unmodified
SERVE_SCRIPT = Path(__file__).parent / "sagemaker_serve" / "serve"
CONFIG = {
    "backend": "python",
    "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
    "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}],
}


def marker_model(marker: Path) -> str:
    """A model.py whose import leaves ``marker``: it ran."""
    return textwrap.dedent(f"""\
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("ran")

        class TritonPythonModel:
            def execute(self, requests):
                return []
        """)


def bls_repository(repo: Path, marker: Path) -> Path:
    """``bls``: a model whose initialize() starts ``inner`` (config and model.py sent in the
    call, as user models start the shared base) with pb_utils.load_model."""
    model = repo / "bls"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    (model / "1" / "model.py").write_text(
        textwrap.dedent(f"""\
        import triton_python_backend_utils as pb_utils

        class TritonPythonModel:
            def initialize(self, args):
                pb_utils.load_model(
                    model_name="inner",
                    config={json.dumps(json.dumps(CONFIG))},
                    files={{"file:1/model.py": {marker_model(marker).encode()!r}}},
                )

            def execute(self, requests):
                return []
        """)
    )
    return repo


# A process of its own, without the key: what a local program or a web page can send.
ATTACK = """
import base64, json, sys, urllib.error, urllib.request
url, marker_dir = sys.argv[1], sys.argv[2]
statuses = []
for n, (content_type, extra) in enumerate(
    [("application/json", {}), ("text/plain", {"Origin": "http://attacker.example"})]
):
    code = f"import pathlib; pathlib.Path({marker_dir!r}, 'evil{n}').write_text('ran')\\n"
    code += "class TritonPythonModel:\\n    def execute(self, requests):\\n        return []\\n"
    config = {"backend": "python", "input": [{"name": "x", "data_type": "TYPE_FP32",
              "dims": [1]}], "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}]}
    body = {"parameters": {"config": json.dumps(config),
                           "file:1/model.py": base64.b64encode(code.encode()).decode()}}
    request = urllib.request.Request(
        f"http://{url}/v2/repository/models/evil{n}/load", data=json.dumps(body).encode(),
        method="POST", headers={"Content-Type": content_type, **extra},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            statuses.append(response.status)
    except urllib.error.HTTPError as exc:
        statuses.append(exc.code)
print(json.dumps(statuses))
"""


def _ready(url: str, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{url}/v2/models/{model}/ready", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.integration
def test_a_process_without_the_key_cannot_load_code(tmp_path):
    (tmp_path / "repo").mkdir()
    with tritonserver([tmp_path / "repo"]) as server:
        done = subprocess.run(
            [sys.executable, "-c", ATTACK, server.url, str(tmp_path)],
            capture_output=True,
            text=True,
            env={"PATH": os.environ["PATH"]},
            timeout=120,
            check=True,
        )
        assert json.loads(done.stdout) == [403, 403], done.stdout
        time.sleep(1.0)  # a load that got through would have run model.py by now
        assert not list(tmp_path.glob("evil*"))
        assert not _ready(server.url, "evil0") and not _ready(server.url, "evil1")


@pytest.mark.integration
def test_the_key_opens_the_repository_api_and_is_on_no_command_line(tmp_path):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    marker = tmp_path / "inner-ran"
    repo = bls_repository(tmp_path / "repo", marker)
    with tritonserver([repo], grpc_port=0) as server:
        key = server.control_key
        path = key_file(int(server.url.rsplit(":", 1)[1]))
        assert read_key(int(server.url.rsplit(":", 1)[1])) == key
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        assert key.encode() not in cmdline and b"--http-restricted-api=" in cmdline

        # our launcher's load sends the key; bls starts inner through the C API, no key
        server.load("bls")
        assert _ready(server.url, "inner") and marker.read_text() == "ran"
        stubs = [
            pid
            for task in Path(f"/proc/{server.process.pid}/task").iterdir()
            for pid in (task / "children").read_text().split()
        ]
        assert len(stubs) >= 2  # bls's and inner's
        for pid in stubs:
            assert KEY_ENV.encode() not in Path(f"/proc/{pid}/environ").read_bytes()

        # gRPC: refused without the key (UNAVAILABLE), taken with it
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException, match="restricted") as err:
            grpc.unload_model("inner")
        assert err.value.status() == "StatusCode.UNAVAILABLE"
        assert grpc.get_model_repository_index(headers=grpc_headers(key)) is not None
        grpc.close()
    assert not path.exists()  # removed at stop


def test_a_key_file_others_can_read_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATARFORGE_BUILD", str(tmp_path))
    with pytest.raises(ControlKeyError, match="no control key for a tritonserver on port 1"):
        read_key(1)
    write_key(key_file(1), "k")
    assert read_key(1) == "k"
    key_file(1).chmod(0o644)
    with pytest.raises(ControlKeyError, match="mode 0600"):
        read_key(1)


# ------------------------------------------------------------- the preload library, listeners


def _cached_library() -> Path:
    """The cached preload library, built: the path computed as the launcher does."""
    source = resources.files("avatarforge").joinpath("data", "loopback_bind.c").read_bytes()
    preload_library()
    return build_dir() / "native" / f"loopback_bind-{hashlib.sha256(source).hexdigest()[:16]}.so"


@pytest.mark.integration
@pytest.mark.parametrize(
    "corrupt",
    [
        lambda good: bytes(len(good)),  # zeroed: ld.so skips it and goes on, the port open
        lambda good: good[:4096],  # cut short: tritonserver dies of SIGBUS
    ],
    ids=["zeroed", "truncated"],
)
def test_a_corrupted_cached_library_is_rebuilt_and_the_port_stays_on_loopback(corrupt, tmp_path):
    library = _cached_library()
    good = library.read_bytes()
    try:
        library.write_bytes(corrupt(good))
        with sagemaker_triton(tmp_path) as server:
            port = int(server.sagemaker_url.rsplit(":", 1)[1])
            assert listening(server.pid) == [("127.0.0.1", port)]
    finally:
        library.write_bytes(good)


@pytest.mark.integration
def test_no_working_library_no_server(tmp_path, monkeypatch, caplog):
    library = _cached_library()
    good = library.read_bytes()
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler to build it again
    try:
        library.write_bytes(b"not a library")
        refused = pytest.raises(ServerError, match=rf"no C compiler.*{ALLOW_EXPOSED_ENV}=1")
        with refused, sagemaker_triton(tmp_path / "mme"):
            pass
        assert not (tmp_path / "mme" / "tritonserver.log").exists()  # nothing started
        # the operator's explicit choice (here a server with every port on 127.0.0.1): it
        # runs, the key on its command line, and the log says so
        monkeypatch.setenv(ALLOW_EXPOSED_ENV, "1")
        (tmp_path / "repo").mkdir()
        with caplog.at_level(logging.WARNING), tritonserver([tmp_path / "repo"]) as server:
            cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
            assert server.control_key.encode() in cmdline
        assert "control key is on its command line" in caplog.text
    finally:
        library.write_bytes(good)


def _address_beyond_loopback() -> str:
    for target in ("10.255.255.255", "203.0.113.1", "8.8.8.8"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((target, 9))  # the address of a route out; no packet is sent
            except OSError:
                continue
            if not (address := s.getsockname()[0]).startswith("127."):
                return address
    pytest.skip("no network interface but loopback")


def test_listeners_are_read_from_proc():
    address = _address_beyond_loopback()
    with (
        socket.socket() as everywhere,
        socket.socket() as outside,
        socket.socket(socket.AF_INET6) as local6,
    ):
        everywhere.bind(("0.0.0.0", 0))
        outside.bind((address, 0))
        local6.bind(("::1", 0))
        for s in (everywhere, outside, local6):
            s.listen()
        ports = [s.getsockname()[1] for s in (everywhere, outside, local6)]
        found = listening(os.getpid())
    assert {("0.0.0.0", ports[0]), (address, ports[1]), ("::1", ports[2])} <= set(found)
    ours = [listener for listener in found if listener[1] in ports]
    assert sorted(beyond_loopback(ours)) == sorted([f"0.0.0.0:{ports[0]}", f"{address}:{ports[1]}"])
    assert beyond_loopback([("::ffff:127.0.0.1", 1), ("::", 2)]) == ["[::]:2"]


@pytest.mark.integration
def test_a_server_listening_beyond_loopback_is_stopped(tmp_path, monkeypatch, caplog):
    address = _address_beyond_loopback()
    (tmp_path / "repo").mkdir()
    # after the launcher's own flags: tritonserver takes this one
    outside = {"metrics_port": 0, "extra_args": [f"--metrics-address={address}"]}
    refused = pytest.raises(ServerError, match=rf"beyond loopback: {address}:\d+; stopped it")
    with refused, tritonserver([tmp_path / "repo"], **outside):
        pass
    monkeypatch.setenv(ALLOW_EXPOSED_ENV, "1")  # the operator's explicit choice: said loudly
    with caplog.at_level(logging.WARNING), tritonserver([tmp_path / "repo"], **outside):
        pass
    assert f"listens beyond loopback: {address}:" in caplog.text


# ----------------------------------------------------------------- the MME: the image's flags


def script_args(env: dict[str, str], tmp: Path) -> list[str]:
    """What the real serve script passes to tritonserver for ``env`` (a stand-in prints it)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    standin = bin_dir / "tritonserver"
    standin.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    standin.chmod(0o755)
    done = subprocess.run(
        ["bash", str(SERVE_SCRIPT)],
        capture_output=True,
        text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        check=True,
    )
    return done.stdout.splitlines()[1:]  # after the script's "running in MME mode" line


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"SAGEMAKER_TRITON_LOG_VERBOSE": LOG_VERBOSE},
        {
            "SAGEMAKER_TRITON_ALLOW_METRICS": "true",
            "SAGEMAKER_TRITON_METRICS_PORT": "9100",
            "SAGEMAKER_TRITON_SHM_DEFAULT_BYTE_SIZE": "33554432",
            "SAGEMAKER_TRITON_LOG_INFO": "false",
            "SAGEMAKER_TRITON_ADDITIONAL_ARGS": "--exit-on-error=false --strict-readiness=true",
        },
    ],
)
def test_mme_flags_are_the_serve_scripts(env, tmp_path):
    env = {"SAGEMAKER_MULTI_MODEL": "true", "SAGEMAKER_BIND_TO_PORT": "8080", **env}
    assert serve_script_args(env, "/tmp/sagemaker") == script_args(env, tmp_path)


@pytest.mark.integration
def test_the_local_mme_runs_the_serve_scripts_flags_and_listens_on_its_port_only(
    sagemaker_server, tmp_path
):
    port = sagemaker_server.sagemaker_url.rsplit(":", 1)[1]
    env = {"SAGEMAKER_MULTI_MODEL": "true", "SAGEMAKER_BIND_TO_PORT": port, **MME_ENV}
    argv = Path(f"/proc/{sagemaker_server.pid}/cmdline").read_text().split("\0")[1:-1]
    repository = next(a for a in argv if a.startswith("--model-repository="))
    expected = [
        repository if a == "--model-repository=/tmp/sagemaker" else a
        for a in script_args(env, tmp_path)
    ]
    # what the launcher adds: the wheel's python backend, a bounded stop; no key (no HTTP/gRPC)
    assert argv[: len(expected)] == expected
    assert [a.split("=")[0] for a in argv[len(expected) :]] == [
        "--backend-directory",
        "--exit-timeout-secs",
    ]
    assert "--allow-http=false" in argv and "--allow-grpc=false" in argv
    assert listening(sagemaker_server.pid) == [("127.0.0.1", int(port))]
    environ = Path(f"/proc/{sagemaker_server.pid}/environ").read_bytes().split(b"\0")
    assert b"SAGEMAKER_TRITON_PING_MODE=live" in environ  # as the deploy plan sets it
    assert sagemaker_server.grpc_url is None and sagemaker_server.metrics_url is None
