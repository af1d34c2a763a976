"""training_container/: the DJL entry point through our stand-in of DJL's Python engine, the
serving.properties the engine reads, the Dockerfile (hadolint) and `make training-image`."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from fixtures.jobs import job_request

from avatarforge.jobs import ServiceConfig

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


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch, service_config: ServiceConfig) -> PythonEngine:
    monkeypatch.syspath_prepend(str(STANDIN))
    for key, value in service_config.to_env().items():
        monkeypatch.setenv(key, value)
    for name in [m for m in sys.modules if m == "djl_python" or m.startswith("djl_python.")]:
        monkeypatch.delitem(sys.modules, name)
    return PythonEngine(CONTAINER)


@pytest.mark.integration
def test_model_py_through_the_djl_python_engine(
    engine: PythonEngine, s3_bucket, alice_photos, monkeypatch
) -> None:
    assert engine.load() == (204, {}, b"")  # warm-up: settings checked, base present

    status, headers, body = engine.request(json.dumps(job_request(s3_bucket)).encode())
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


def test_a_failing_warm_up_fails_the_model_load(engine: PythonEngine, monkeypatch) -> None:
    monkeypatch.setenv("AVATARFORGE_SERVICE_MAX_PHOTOS", "lots")
    status, _, body = engine.load()  # the exception leaves handle: DJL's 424
    assert status == 424
    assert "AVATARFORGE_SERVICE_MAX_PHOTOS: expected an integer" in json.loads(body)["error"]


def test_model_py_is_a_thin_adapter() -> None:
    code = [
        line
        for line in (CONTAINER / "model.py").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
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
    done = subprocess.run(
        ["bash", str(CONTAINER / "build.sh")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "AVATARFORGE_BUILD": str(tmp_path)},
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no Docker engine runs on this machine" in done.stderr
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
