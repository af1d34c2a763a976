"""training_container/: the DJL entry point through our stand-in of DJL's Python engine, the
serving.properties the engine reads, the Dockerfile (hadolint) and `make training-image`."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pytest
from fixtures.jobs import job_request, make_service_config

from avatarforge.jobs import ServiceConfig
from avatarforge.jobs.slots import training_slot

REPO = Path(__file__).resolve().parents[1]
CONTAINER = REPO / "training_container"
STANDIN = Path(__file__).resolve().parent / "djl_standin"


def read_properties(path: Path) -> dict[str, str]:
    """serving.properties as DJL reads it: key=value lines, '#' comments."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


class PythonEngine:
    """Plays DJL's Python engine (python_sync_engine + service_loader) around model.py."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.properties = read_properties(model_dir / "serving.properties")
        entry = model_dir / self.properties["option.entryPoint"]
        spec = importlib.util.spec_from_file_location("model", entry)
        assert spec is not None and spec.loader is not None
        self.module: ModuleType = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)

    def _invoke(self, inputs) -> tuple[int, dict[str, str], bytes]:
        from djl_python import Output

        inputs.properties["model_dir"] = str(self.model_dir)
        try:
            output = self.module.handle(inputs)
            if output is None:
                output = Output(code=204, message="No content")
            elif not isinstance(output, Output):
                output = Output().error(f"Invalid output type: {type(output)}")
        except Exception as exc:  # as DJL: any exception is a 424 with its message
            output = Output().error(str(exc))
        assert output.content.size() <= 1
        body = bytes(output.content.value_at(0)) if output.content.size() else b""
        return output.code, output.properties, body

    def load(self) -> tuple[int, dict[str, str], bytes]:
        """The load-time call: an empty Input carrying the option.* settings."""
        from djl_python import Input

        inputs = Input()
        inputs.properties.update(
            {k[len("option.") :]: v for k, v in self.properties.items() if k.startswith("option.")}
        )
        return self._invoke(inputs)

    def request(self, body: bytes, content_type: str = "application/json"):
        """One HTTP request: headers as properties, the body under "data" (a bytearray)."""
        from djl_python import Input

        inputs = Input()
        inputs.properties.update({"Content-Type": content_type, "X-Amzn-SageMaker-Custom": "1"})
        inputs.content.add(key="data", value=bytearray(body))
        return self._invoke(inputs)


class Worker:
    """One DJL worker around the engine (WorkerThread + PyProcess): the load-time call first,
    then the requests one at a time in arrival order. DJL answers /ping 200 while a worker
    still loads (ModelManager.workerStatus) and queues the requests that arrive meanwhile
    (WorkLoadManager.runJob), so requests can come during the load; each waits here."""

    def __init__(self, engine: PythonEngine) -> None:
        self.engine = engine
        self.thread = ThreadPoolExecutor(max_workers=1)  # one Python process: one call at a time
        self.loading: Future = self.thread.submit(engine.load)

    def submit(self, body: bytes) -> tuple[float, Future]:
        """The request's arrival time and its answer to come."""
        return time.monotonic(), self.thread.submit(self.engine.request, body)

    def close(self) -> None:
        self.thread.shutdown(wait=True)


@contextlib.contextmanager
def peer_fetching_the_base(config: ServiceConfig) -> Iterator[None]:
    """Hold the lock a process fetching the base holds (the other DJL worker, say): whoever
    wants the base meanwhile, the warm-up included, waits for it."""
    from avatarforge.serving.shared_files import _key, _lock

    with _lock(config.shared_path(), f"base-{_key(config.base_source)}"):
        yield


def use_config(monkeypatch: pytest.MonkeyPatch, config: ServiceConfig) -> None:
    for key, value in config.to_env().items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def base_tarball(tiny_base) -> str:
    """The tiny base as a tarball: fetched (and locked) as an instance fetches its base."""
    from avatarforge.deploy import base_asset

    return str(base_asset("tiny").path)


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch, service_config: ServiceConfig) -> PythonEngine:
    monkeypatch.syspath_prepend(str(STANDIN))
    use_config(monkeypatch, service_config)
    for name in [m for m in sys.modules if m == "djl_python" or m.startswith("djl_python.")]:
        monkeypatch.delitem(sys.modules, name)
    return PythonEngine(CONTAINER)


@pytest.mark.integration
def test_model_py_through_the_djl_python_engine(
    engine: PythonEngine, s3_bucket, alice_photos, monkeypatch, service_config, base_tarball
) -> None:
    # an instance scaled from zero: the first job arrives while the worker warms up (the base
    # is being fetched); it waits for the warm-up and succeeds
    config = ServiceConfig(**{**service_config.__dict__, "base_source": base_tarball})
    use_config(monkeypatch, config)
    with peer_fetching_the_base(config):
        worker = Worker(engine)
        _, first = worker.submit(json.dumps(job_request(s3_bucket)).encode())
        time.sleep(1.0)
        assert not worker.loading.done() and not first.done()  # both wait for the base
    try:
        assert worker.loading.result(timeout=60) == (204, {}, b"")  # settings checked, base here
        status, headers, body = first.result(timeout=600)
    finally:
        worker.close()
    assert status == 200 and headers == {"content-type": "application/json"}
    result = json.loads(body)
    assert result["status"] == "succeeded"
    assert result["model_uri"] == f"s3://{s3_bucket}/af/models/alice.tar.gz"

    # the request's fault: 400 with DJL's error body, the message naming the field
    status, _, body = engine.request(json.dumps(job_request(s3_bucket, user="../x")).encode())
    error = json.loads(body)
    assert status == 400 and error["code"] == 400 and error["message"] == "bad training request"
    assert error["error"].startswith("user: '../x' is not a valid user id")
    status, _, body = engine.request(b"")  # an empty body after the load is a bad request
    assert status == 400 and "empty request" in json.loads(body)["error"]
    status, _, _ = engine.request(b"<xml/>", content_type="application/xml")
    assert status == 415

    # our failure: a 5xx, never a success-shaped answer
    missing = f"s3://{s3_bucket}/shared/no-such-base.tar.gz"
    monkeypatch.setenv("AVATARFORGE_SERVICE_BASE_SOURCE", missing)
    status, _, body = engine.request(json.dumps(job_request(s3_bucket, job_id="job-2")).encode())
    error = json.loads(body)
    assert status == 500 and error["message"] == "training job failed"
    assert "no-such-base.tar.gz" in error["error"]


@pytest.mark.integration
def test_a_job_that_waited_for_the_warm_up_answers_within_its_invocation_timeout(
    engine: PythonEngine, monkeypatch, tmp_path: Path, base_tarball, s3_bucket
) -> None:
    """SageMaker's InvocationTimeoutSeconds runs from the job's arrival, the warm-up it waited
    for included: the job must stop (resumable) before it ends, not a warm-up later."""
    deadline_s, timeout_s, warm_up_s = 5.0, 6.0, 3.0  # deploy: deadline = timeout - margin
    config = make_service_config(
        tmp_path / "svc", base_source=base_tarball, deadline_s=deadline_s, finish_reserve_s=0.5
    )
    use_config(monkeypatch, config)
    request = job_request(s3_bucket, job_id="late-1")  # its photos are never read
    # both training slots busy (two jobs running): the job can only wait for its deadline
    with (
        training_slot(config.slots_path(), 2, owner="a"),
        training_slot(config.slots_path(), 2, owner="b"),
    ):
        with peer_fetching_the_base(config):
            worker = Worker(engine)
            arrived, answer = worker.submit(json.dumps(request).encode())
            time.sleep(warm_up_s)
            assert not worker.loading.done()  # the warm-up waits for the base
        try:
            status, _, body = answer.result(timeout=60)
            answered = time.monotonic() - arrived
        finally:
            worker.close()
    assert worker.loading.result() == (204, {}, b"")
    assert answered < timeout_s, f"answered {answered:.1f} s after arriving"
    error = json.loads(body)
    assert status == 504 and "re-submit the same job id" in error["error"]  # resumable


def test_a_failing_warm_up_fails_the_model_load(engine: PythonEngine, monkeypatch) -> None:
    monkeypatch.setenv("AVATARFORGE_SERVICE_MAX_PHOTOS", "lots")
    status, _, body = engine.load()  # the exception leaves handle: DJL's 424
    assert status == 424
    assert "AVATARFORGE_SERVICE_MAX_PHOTOS: expected an integer" in json.loads(body)["error"]


def test_model_py_is_a_thin_adapter() -> None:
    source = (CONTAINER / "model.py").read_text()
    docstrings = {
        line
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Module | ast.FunctionDef) and ast.get_docstring(node)
        for line in range(node.body[0].lineno, node.body[0].end_lineno + 1)
    }
    code = [
        line
        for number, line in enumerate(source.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#") and number not in docstrings
    ]
    assert len(code) < 40  # the job is avatarforge.jobs, tested outside any server


def test_serving_properties_fit_the_service() -> None:
    props = read_properties(CONTAINER / "serving.properties")
    config = ServiceConfig()
    assert props["engine"] == "Python"
    assert (CONTAINER / props["option.entryPoint"]).is_file()
    assert props["batch_size"] == "1"
    # DJL must not cut a job off before the job's own deadline ends it cleanly
    assert float(props["option.predict_timeout"]) > config.deadline_s
    assert float(props["option.predict_timeout"]) <= 3600  # async InvocationTimeoutSeconds max
    # one worker process per concurrent job
    assert int(props["minWorkers"]) == int(props["maxWorkers"]) == config.max_concurrent_jobs


def test_dockerfile_passes_hadolint_and_names_its_base() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run(
        [str(hadolint), str(CONTAINER / "Dockerfile")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = (CONTAINER / "Dockerfile").read_text()
    assert "ARG LMI_REPOSITORY=763104351884.dkr.ecr.us-east-1.amazonaws.com/djl-inference" in text
    assert "ARG LMI_TAG=0.36.0-lmi27.0.0-cu130" in text
    assert "FROM ${LMI_REPOSITORY}:${LMI_TAG}" in text
    assert "[service]" in text and "/opt/ml/model/" in text


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_make_training_image_builds_the_wheel_and_says_why_it_stops(tmp_path: Path) -> None:
    engine_runs = subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    if engine_runs:
        pytest.skip("a Docker engine runs here: building the image is not a test")
    config = tmp_path / "deploy.json"
    config.write_text(json.dumps({"region": "eu-west-1"}))
    done = subprocess.run(
        ["bash", str(CONTAINER / "build.sh")],
        capture_output=True,
        text=True,
        env={
            "PATH": "/usr/bin:/bin:/usr/local/bin",
            "AVATARFORGE_BUILD": str(tmp_path),
            "CONFIG": str(config),
        },
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no Docker engine runs on this machine" in done.stderr
    # the deployment region's LMI image, as the sagemaker SDK lists it, and how to log in
    registry = "763104351884.dkr.ecr.eu-west-1.amazonaws.com"
    assert f"FROM {registry}/djl-inference:0.36.0-lmi27.0.0-cu130" in done.stdout
    assert (
        "aws ecr get-login-password --region eu-west-1 | docker login --username AWS "
        f"--password-stdin {registry}"
    ) in done.stderr
    context = tmp_path / "training-image"
    (wheel,) = (context / "wheels").glob("avatarforge-*.whl")
    assert {p.name for p in context.iterdir()} == {
        "Dockerfile",
        "serving.properties",
        "model.py",
        "wheels",
    }
    import zipfile

    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
    assert "avatarforge/jobs/handler.py" in names and "avatarforge/jobs/run.py" in names


def test_make_training_image_builds_from_the_regions_lmi_and_says_how_to_log_in(
    tmp_path: Path,
) -> None:
    """With an engine (a stand-in docker CLI here: `info` works, `build` cannot pull the base),
    the build gets the region's LMI image and a failure ends with the registry's login."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  info) exit 0 ;;\n"
        f'  build) echo "$@" > {tmp_path}/build-args\n'
        '    echo "ERROR: failed to solve: unexpected status 401 Unauthorized" >&2; exit 1 ;;\n'
        "esac\n"
    )
    (bin_dir / "docker").chmod(0o755)
    config = tmp_path / "deploy.json"
    config.write_text(json.dumps({"region": "ap-southeast-5"}))  # a registry of its own
    done = subprocess.run(
        ["bash", str(CONTAINER / "build.sh")],
        capture_output=True,
        text=True,
        env={
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "AVATARFORGE_BUILD": str(tmp_path),
            "CONFIG": str(config),
            "IMAGE": "af-training:test",
        },
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    args = (tmp_path / "build-args").read_text().split()
    registry = "550225433462.dkr.ecr.ap-southeast-5.amazonaws.com"
    assert f"LMI_REPOSITORY={registry}/djl-inference" in args
    assert "LMI_TAG=0.36.0-lmi27.0.0-cu130" in args and "af-training:test" in args
    assert "401 Unauthorized" in done.stderr  # docker's own error first
    assert (
        f"aws ecr get-login-password --region ap-southeast-5 | docker login --username AWS "
        f"--password-stdin {registry}"
    ) in done.stderr
