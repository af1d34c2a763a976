"""`avatarforge submit`, `status` and `generate --endpoint` against moto and the local runtime:
what they print, the files they write and their exit codes."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
from fixtures.cloud import json_bytes, prompt_color, result_for
from PIL import Image
from typer.testing import CliRunner

from avatarforge.cli import app
from avatarforge.cloud.client import submit

pytestmark = pytest.mark.integration
runner = CliRunner()


def succeed(body: bytes, content_type: str | None) -> bytes:
    return json_bytes(result_for(json.loads(body)))


def where(config) -> list[str]:
    return ["--bucket", config.bucket, "--name", config.name]


def selfies(folder: Path) -> Path:
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.jpg").write_bytes(b"\xff\xd8\xff" + bytes([i]) * 50)
    return folder


def test_submit_then_status_prints_the_result(cloud_config, start_runtime, tmp_path) -> None:
    _, worker = start_runtime(succeed)
    args = ["--user", "alice", "--photos", str(selfies(tmp_path / "p")), "--job-id", "alice-7"]
    result = runner.invoke(app, ["submit", *args, "--train", '{"steps": 5}', *where(cloud_config)])
    assert result.exit_code == 0, result.output
    assert "alice-7" in result.output
    assert cloud_config.async_output_prefix in result.output
    assert cloud_config.async_failure_prefix in result.output
    assert worker.wait_idle(10)
    config_file = tmp_path / "deploy.json"
    config_file.write_text(json.dumps({"bucket": cloud_config.bucket, "name": cloud_config.name}))
    result = runner.invoke(app, ["status", "alice-7", "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    for text in ("succeeded", "alice.tar.gz", "photos kept", "a.jpg", "b.txt: not an image"):
        assert text in result.output
    result = runner.invoke(app, ["status", "alice-7", "--json", *where(cloud_config)])
    assert json.loads(result.stdout)["status"] == "succeeded"


def test_status_exit_codes_for_failed_and_pending(cloud_config, start_runtime, tmp_path) -> None:
    release = threading.Event()

    def handler(body: bytes, content_type: str | None) -> bytes:
        request = json.loads(body)
        if request["user"] == "bad":
            raise ValueError("photos: none of 2 photos has a usable face")
        release.wait(20)
        return succeed(body, content_type)

    _, worker = start_runtime(handler, max_concurrent=1)
    for user in ("bad", "late"):
        args = ["--user", user, "--photos", str(selfies(tmp_path / user)), "--job-id", f"{user}-1"]
        assert runner.invoke(app, ["submit", *args, *where(cloud_config)]).exit_code == 0
    try:
        result = runner.invoke(app, ["status", "bad-1", "--wait", "10", *where(cloud_config)])
        assert result.exit_code == 1, result.output
        assert "failed" in result.output and "none of 2 photos has a usable face" in result.output
        result = runner.invoke(app, ["status", "late-1", *where(cloud_config)])
        assert result.exit_code == 3 and "pending" in result.output
    finally:
        release.set()
    assert worker.wait_idle(10)
    assert runner.invoke(app, ["status", "late-1", *where(cloud_config)]).exit_code == 0


@pytest.mark.smoke
def test_clear_errors_without_a_traceback(cloud_config, start_runtime, tmp_path) -> None:
    start_runtime(succeed)
    cases = [
        (["submit", "--user", "a", "--photos", str(tmp_path)], 2, "no bucket"),
        (["status", "nobody-1", *where(cloud_config)], 1, "no job 'nobody-1'"),
        (["status", "../x", *where(cloud_config)], 1, "not a valid job id"),
        (["submit", "--user", "a/b", "--photos", str(tmp_path), *where(cloud_config)], 1, "user"),
        (["submit", "--user", "a", "--photos", str(tmp_path), *where(cloud_config)], 1, "no files"),
        (
            [
                "submit",
                "--user",
                "a",
                "--photos",
                "s3://b/p/",
                "--train",
                "[1]",
                *where(cloud_config),
            ],
            2,
            "--train: must be a JSON object",
        ),
    ]
    for args, code, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


def test_generate_endpoint_saves_the_servers_jpegs_and_never_overwrites(
    cloud_config, mme_runtime, tmp_path
) -> None:
    out = tmp_path / "images"
    out.mkdir()
    (out / "00.jpg").write_bytes(b"mine")  # someone's file: kept as it is
    args = ["generate", "--endpoint", cloud_config.mme_endpoint_name, "--user", "quick"]
    args += ["--prompt", "an astronaut", "--gen-args", '{"num_images": 2}', "--out", str(out)]
    args += ["--region", "us-east-1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert (out / "00.jpg").read_bytes() == b"mine"
    assert sorted(p.name for p in out.iterdir()) == [f"0{i}.jpg" for i in range(5)]
    assert str(out / "04.jpg") in second.output
    for name in ("01.jpg", "04.jpg"):
        with Image.open(out / name) as image:
            assert image.format == "JPEG"
            color = image.convert("RGB").getpixel((8, 8))
        expected = prompt_color("an astronaut")
        assert max(abs(a - b) for a, b in zip(color, expected, strict=True)) <= 3
    # a user with no model: the endpoint's answer and, given the deployment, what to do
    config_file = tmp_path / "deploy.json"
    config_file.write_text(json.dumps({"bucket": cloud_config.bucket, "name": cloud_config.name}))
    args = ["generate", "--endpoint", cloud_config.mme_endpoint_name, "--user", "nobody"]
    result = runner.invoke(app, [*args, "--prompt", "x", "--config", str(config_file)])
    assert result.exit_code == 1 and "submit a training job first" in result.output
    result = runner.invoke(app, [*args, "--prompt", "x", "--gen-args", '{"steps": 0}'])
    assert result.exit_code == 1 and "gen_args.steps" in result.output


def test_submit_sends_the_deployments_invocation_timeout_and_queue_ttl(
    cloud_config, start_runtime
) -> None:
    """RequestTTLSeconds is per request: unless the client sends it, a job may wait 6 h in the
    queue (SageMaker's default) before anyone hears that it could not start."""
    import boto3

    start_runtime(succeed)
    session = boto3.session.Session()
    sent: list[dict[str, str]] = []

    def record(request, **_) -> None:  # botocore's hook: sees the request as it leaves
        sent.append(
            {k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        )

    session.events.register("before-send.sagemaker-runtime.InvokeEndpointAsync", record)
    submit(
        cloud_config, "tia", f"s3://{cloud_config.bucket}/up/tia/", job_id="tia-1", session=session
    )
    shorter = dataclasses.replace(cloud_config, training_request_ttl_s=900)
    submit(shorter, "tia", f"s3://{cloud_config.bucket}/up/tia/", job_id="tia-2", session=session)
    assert [h.get("X-Amzn-SageMaker-RequestTTLSeconds") for h in sent] == ["7200", "900"]
    assert {h["X-Amzn-SageMaker-InvocationTimeoutSeconds"] for h in sent} == {"3600"}
