"""`avatarforge serve local-triton`, `serve load`, `mme serve` and `generate` as a user runs them.

The servers run as the real commands, in their own processes (`python -m avatarforge ...`), on
free ports given with --port/--grpc-port/--metrics-port (the defaults, 8000/8001/8002 and 8080,
are the ports people know; a test must not depend on them being free); each is stopped with
SIGTERM, as Ctrl-C or a supervisor stops it, and killed if it does not stop. The local MME's
tritonserver runs with the SageMaker image's flags (its HTTP and gRPC off); its metrics are
turned on as on SageMaker, with SAGEMAKER_TRITON_ALLOW_METRICS.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fixtures.images import pixels
from PIL import Image
from typer.testing import CliRunner

from avatarforge.cli import app
from avatarforge.mme.front import invoke_endpoint
from avatarforge.mme.generate import generate_request
from avatarforge.netutil import free_port
from avatarforge.serving import client
from avatarforge.serving.package_check import checksum_path, write_checksum
from avatarforge.tritonserver.launch import PortInUseError, tritonserver

runner = CliRunner()
SMALL = {"steps": 2, "height": 64, "width": 64, "seed": 7}
PROMPT = "a photo of <<TOK>> person"


# ------------------------------------------------------------------------------------ helpers


def listening_addresses(port: int) -> set[str]:
    """The local addresses of sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, raw))
    return found


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@dataclass
class Started:
    process: subprocess.Popen
    output: Path
    ports: dict[str, int]

    def text(self) -> str:
        return self.output.read_text(errors="replace")


def start_cli(
    args: list[str], out: Path, ready: str, timeout: float = 240.0, env: dict | None = None
) -> Started:
    """Run ``avatarforge ARGS`` in its own process until ``ready`` appears in its output."""
    log = open(out, "wb")  # noqa: SIM115 - the process writes it while the tests run
    process = subprocess.Popen(
        [sys.executable, "-m", "avatarforge", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "80", **(env or {})},
    )
    log.close()
    started = Started(process, out, {})
    deadline = time.monotonic() + timeout
    while ready not in started.text():
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            pytest.fail(f"avatarforge {' '.join(args)} did not start:\n{started.text()[-3000:]}")
        time.sleep(0.2)
    return started


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # unwinds like Ctrl-C: servers stopped
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def reencoded_max_diff(jpeg: bytes) -> int:
    """What decoding and encoding again (the old `generate`) would have changed, at most."""
    image = Image.open(io.BytesIO(jpeg))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=95)
    return int(np.abs(pixels(image) - pixels(Image.open(io.BytesIO(buf.getvalue())))).max())


# --------------------------------------------------------------- ports: checked before start


@pytest.fixture
def busy_port():
    """A port something listens on (all interfaces, as most servers do)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    ("option", "what"),
    [("--port", "HTTP"), ("--grpc-port", "gRPC"), ("--metrics-port", "metrics")],
)
def test_local_triton_port_in_use_names_the_port_and_the_option(busy_port, option, what):
    others = {"--port": "0", "--grpc-port": "0", "--metrics-port": "0"}
    args = [x for k, v in {**others, option: str(busy_port)}.items() for x in (k, v)]
    result = runner.invoke(app, ["serve", "local-triton", *args])
    assert result.exit_code == 1, result.output
    assert f"port {busy_port} ({what}) is already in use on 127.0.0.1" in result.output
    assert f"choose another port with {option} N" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("option", "what"),
    [("--port", "MME front"), ("--sagemaker-port", "SageMaker")],
)
def test_local_mme_port_in_use_names_the_port_and_the_option(busy_port, option, what, tmp_path):
    args = ["mme", "serve", "--source", str(tmp_path), option, str(busy_port)]
    if option != "--port":
        args += ["--port", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert f"port {busy_port} ({what}) is already in use" in result.output
    assert f"with {option} N" in result.output


def test_the_launcher_refuses_a_port_in_use_before_starting(busy_port, tmp_path):
    with pytest.raises(PortInUseError) as err, tritonserver([tmp_path], metrics_port=busy_port):
        pass
    assert (err.value.port, err.value.what) == (busy_port, "metrics")
    assert not list(tmp_path.iterdir())  # nothing was started


def test_known_ports_are_the_defaults():
    help_text = runner.invoke(app, ["serve", "local-triton", "--help"]).output
    for default in ("8000", "8001", "8002"):
        assert f"[default: {default};" in help_text
    assert "[default: 8080;" in runner.invoke(app, ["mme", "serve", "--help"]).output


# ------------------------------------------------------------ local-triton, as a user runs it


def _package_folder(packaged_users, tmp: Path) -> Path:
    """``tmp/package`` holding every packaged user and its published sha256, as `package` wrote."""
    source = tmp / "package"
    source.mkdir()
    for package in packaged_users.values():
        for path in (package, checksum_path(package)):
            shutil.copy(path, source / path.name)
    return source


@pytest.fixture(scope="module")
def local_triton(packaged_users, tmp_path_factory):
    """`avatarforge serve local-triton` serving alice (bob is packaged but not loaded)."""
    tmp = tmp_path_factory.mktemp("local-triton")
    source = _package_folder(packaged_users, tmp)
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    args = ["serve", "local-triton", "--source", str(source), "--users", "alice"]
    args += ["--port", str(ports["http"]), "--grpc-port", str(ports["grpc"])]
    args += ["--metrics-port", str(ports["metrics"]), "--shared-dir", str(tmp / "shared")]
    started = time.perf_counter()
    server = start_cli(args, tmp / "local-triton.out", ready="add a newly packaged user")
    print(f"\nlocal-triton ready in {time.perf_counter() - started:.1f} s")
    server.ports = ports
    try:
        yield server
    finally:
        stop(server.process)
    assert server.process.returncode == 0, server.text()[-2000:]
    assert "stopped" in server.text()


@pytest.mark.integration
def test_local_triton_prints_its_urls_and_listens_on_loopback_only(local_triton):
    out, ports = local_triton.text(), local_triton.ports
    http, grpc, metrics = ports["http"], ports["grpc"], ports["metrics"]
    assert f"HTTP     http://127.0.0.1:{http}" in out
    assert f"gRPC     127.0.0.1:{grpc}" in out
    assert f"metrics  http://127.0.0.1:{metrics}/metrics  (Prometheus)" in out
    for port in ports.values():
        addresses = listening_addresses(port)
        assert addresses and addresses <= LOOPBACK, (port, addresses)
    # the key that opens the APIs that change the server: for this user only
    key = Path(re.search(r"with the key in (\S+) \(this user only\)", out).group(1))
    assert key.stat().st_mode & 0o777 == 0o600
    # metrics: Prometheus text with per-model counters, after a request
    client.generate(f"127.0.0.1:{http}", "alice", PROMPT, gen_args=SMALL)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    count = re.search(r'nv_inference_request_success\{model="alice",version="1"\} (\d+)', text)
    assert count and int(count.group(1)) >= 1, text[:2000]
    # gRPC: the same server answers there
    grpcclient = pytest.importorskip("tritonclient.grpc")
    grpc_client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
    assert grpc_client.is_server_live() and grpc_client.is_model_ready("alice")
    grpc_client.close()


@pytest.mark.integration
def test_serve_load_adds_a_user_to_the_running_server(local_triton, packaged_users, tmp_path):
    url = f"127.0.0.1:{local_triton.ports['http']}"
    source = str(next(iter(packaged_users.values())).parent)
    pid = local_triton.process.pid
    with pytest.raises(client.ModelNotFoundError, match="bob"):
        client.generate(url, "bob", PROMPT, gen_args=SMALL)

    result = runner.invoke(app, ["serve", "load", "bob", "--url", url, "--source", source])
    assert result.exit_code == 0, result.output
    assert f"loaded bob on {url}" in result.output
    print(f"\n{result.output.strip()}")
    bob = client.generate(url, "bob", PROMPT, gen_args=SMALL)[0]
    alice = client.generate(url, "alice", PROMPT, gen_args=SMALL)[0]
    assert np.abs(pixels(bob) - pixels(alice)).mean() > 1.0  # bob's own adapter answers
    assert local_triton.process.poll() is None and local_triton.process.pid == pid

    # loading a user again (a new package) replaces it; the server keeps serving it
    result = runner.invoke(app, ["serve", "load", "bob", "--url", url, "--source", source])
    assert result.exit_code == 0, result.output
    again = client.generate(url, "bob", PROMPT, gen_args=SMALL)[0]
    assert np.abs(pixels(again) - pixels(bob)).max() <= 2
    repository = Path(re.search(r"\(repository (\S+)\)", local_triton.text()).group(1))
    assert sorted(p.name for p in repository.iterdir()) == ["alice", "bob", "model_setup"]


@pytest.mark.integration
def test_serve_load_refuses_what_it_cannot_load_and_leaves_the_repository(local_triton, tmp_path):
    url = f"127.0.0.1:{local_triton.ports['http']}"
    repository = Path(re.search(r"\(repository (\S+)\)", local_triton.text()).group(1))
    before = sorted(p.name for p in repository.iterdir())
    # an archive that escapes its folder: refused before anything is written
    evil = io.BytesIO(b"pwned")
    with tarfile.open(tmp_path / "mallory.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../../mallory.txt")
        info.size = 5
        tar.addfile(info, evil)
    write_checksum(tmp_path / "mallory.tar.gz")  # published as the packager does: intact
    cases = [
        (["mallory"], "path traversal"),
        (["carol"], "no package"),
        (["../x"], "not a valid user id"),
        (["mallory", "--repository", str(tmp_path)], "does not serve"),
    ]
    for args, message in cases:
        result = runner.invoke(
            app, ["serve", "load", *args[:1], "--url", url, "--source", str(tmp_path), *args[1:]]
        )
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output
    assert sorted(p.name for p in repository.iterdir()) == before  # no leftovers, no mallory
    assert not (repository.parent.parent / "mallory.txt").exists()
    # a model that is not what the packager writes: refused, the repository left as it was
    broken = tmp_path / "broken" / "dave"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: 0\nnot a field: 1\n')
    (broken / "1" / "model.py").write_text("")
    with tarfile.open(tmp_path / "dave.tar.gz", "w:gz") as tar:
        tar.add(broken, arcname="dave")
    write_checksum(tmp_path / "dave.tar.gz")
    result = runner.invoke(app, ["serve", "load", "dave", "--url", url, "--source", str(tmp_path)])
    assert result.exit_code == 1 and "incomplete, missing" in result.output, result.output
    assert sorted(p.name for p in repository.iterdir()) == before


@pytest.mark.integration
def test_generate_url_saves_the_servers_bytes_and_never_overwrites(local_triton, tmp_path):
    url = f"127.0.0.1:{local_triton.ports['http']}"
    gen = json.dumps({**SMALL, "num_images": 2})
    args = ["generate", "--url", url, "--user", "alice", "--prompt", PROMPT, "--gen-args", gen]
    out = tmp_path / "images"
    for _ in range(2):
        result = runner.invoke(app, [*args, "--out", str(out)])
        assert result.exit_code == 0, result.output
    files = sorted(out.iterdir())
    assert [p.name for p in files] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]
    assert result.output.split() == [str(out / "02.jpg"), str(out / "03.jpg")]
    # what the server sends for this request (same seed, same bytes), base64-decoded
    inputs = client.build_inputs([PROMPT], None, [{**SMALL, "num_images": 2}])
    sent = client.decode_jpegs(client.infer(_http(url), "alice", inputs))[0]
    assert [p.read_bytes() for p in files] == sent * 2
    changed = reencoded_max_diff(sent[0])
    print(f"\nre-encoding the server's JPEG would change pixels by up to {changed}/255")
    assert changed > 0  # saving decoded images again could not pass this test


def _http(url: str):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url, network_timeout=600.0)


# --------------------------------------------------------------- local-mme, as a user runs it


@pytest.fixture(scope="module")
def local_mme(packaged_users, tmp_path_factory):
    """`avatarforge mme serve` with alice.tar.gz and bob.tar.gz in its source folder."""
    tmp = tmp_path_factory.mktemp("local-mme")
    source = _package_folder(packaged_users, tmp)
    ports = {name: free_port() for name in ("front", "sagemaker", "metrics")}
    args = ["mme", "serve", "--source", str(source), "--root", str(tmp / "models")]
    args += ["--port", str(ports["front"]), "--sagemaker-port", str(ports["sagemaker"])]
    args += ["--shared-dir", str(tmp / "shared")]
    metrics = {  # as a SageMaker model's environment turns them on
        "SAGEMAKER_TRITON_ALLOW_METRICS": "true",
        "SAGEMAKER_TRITON_METRICS_PORT": str(ports["metrics"]),
    }
    server = start_cli(args, tmp / "local-mme.out", ready="TargetModels from", env=metrics)
    server.ports = ports
    try:
        yield server
    finally:
        stop(server.process)
    assert server.process.returncode == 0, server.text()[-2000:]


@pytest.mark.integration
def test_local_mme_prints_its_urls_and_generate_saves_the_servers_bytes(local_mme, tmp_path):
    out, ports = local_mme.text(), local_mme.ports
    front = f"http://127.0.0.1:{ports['front']}"
    assert f"MME front        {front}" in out
    assert f"SageMaker front  http://127.0.0.1:{ports['sagemaker']}" in out
    assert f"metrics          http://127.0.0.1:{ports['metrics']}/metrics" in out
    assert "gRPC" not in out and "HTTP" not in out  # off, as on SageMaker
    for name in ("front", "sagemaker", "metrics"):
        addresses = listening_addresses(ports[name])
        assert addresses and addresses <= LOOPBACK, (name, addresses)

    gen = {**SMALL, "num_images": 2, "num_inference_steps": 2}
    del gen["steps"]  # the published sample's name for it
    args = ["generate", "--mme", front, "--target-model", "bob.tar.gz", "--prompt", PROMPT]
    args += ["--gen-args", json.dumps(gen), "--out", str(tmp_path)]
    (tmp_path / "00.jpg").write_bytes(b"mine")  # someone's file: kept
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00.jpg", "01.jpg", "02.jpg"]
    assert (tmp_path / "00.jpg").read_bytes() == b"mine"
    response = invoke_endpoint(front, "bob.tar.gz", generate_request(PROMPT, gen_args=gen))
    sent = [base64.b64decode(text) for text in response["outputs"][0]["data"]]
    assert [(tmp_path / n).read_bytes() for n in ("01.jpg", "02.jpg")] == sent
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics") as response:
        metrics = response.read().decode()
    # with model namespacing (as on SageMaker) the label is the TargetModel; two requests
    assert re.search(r'nv_inference_request_success\{model="bob.tar.gz",[^}]*\} 2$', metrics, re.M)
