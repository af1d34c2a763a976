"""The three demos end to end: `make demo` (samples -> preprocess -> train -> package ->
tritonserver -> sheet), `make demo-service` (one job against moto S3, then the local MME serves
the tarball the job wrote, from its S3 key) and `make demo-cloud` (the whole system on this
machine: moto S3/SNS/SQS, the real training service behind the local async runner, the real
tritonserver MME fed from the models prefix the job wrote, and the cloud client driving it:
sample selfies -> submit -> SNS notification in SQS -> status -> generate -> JPEGs and a contact
sheet), with tiny training settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.jobs import SERVICE_TRAIN, stack_service
from fixtures.load import busy_cpu
from fixtures.train import FIXTURE_TRAIN
from PIL import Image

from avatarforge.demos import cloud, service
from avatarforge.demos.local import PROMPTS, run_demo
from avatarforge.serving.config import local_instance_env


@pytest.mark.integration
@pytest.mark.slow
def test_demo_runs_the_whole_path_on_a_busy_cpu_and_triton_matches_diffusers(tmp_path):
    # two busy loops beside it, as on a shared 2-core machine. Before: 368 s here (training
    # 96 s, diffusers 175 s, tritonserver 53 s: torch's spinning threads), and a new user's
    # first run failed at the tritonserver step ("not done within serving.request_timeout_s");
    # now 85 s (92 s beside four loops)
    with busy_cpu(2):
        state = run_demo(tmp_path / "demo")
    assert (state.dataset / "manifest.json").is_file()
    assert state.package is not None and state.package.name == "demo.tar.gz"
    assert list(state.rows) == list(PROMPTS)
    for row in state.rows.values():
        assert list(row) == ["base", "local", "diff x8", "triton"]
        triton = np.asarray(Image.open(row["triton"]))
        assert triton.shape == (256, 256, 3)
        local = np.asarray(Image.open(row["local"]))
        assert not np.array_equal(np.asarray(Image.open(row["base"])), local)  # adapter acts
    # through the same JPEG encoder, tritonserver's images are the diffusers images
    assert state.triton_vs_local is not None and state.triton_vs_local <= 2
    sheet = Image.open(tmp_path / "demo" / "contact_sheet.png")
    assert sheet.width > 4 * 192 and sheet.height > 3 * 192


def test_the_demo_command_prints_what_each_step_did(monkeypatch, tmp_path):
    # the demo prints nothing itself: the CLI prints each step's title and what it returned
    from typer.testing import CliRunner

    from avatarforge.cli import app
    from avatarforge.demos import local

    def first(state) -> str:
        state.dataset, state.package = state.out / "dataset", state.out / "demo.tar.gz"
        return "made one\nand two"

    monkeypatch.setattr(local, "STEPS", (("first step", first), ("second", lambda s: "three")))
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for text in ("1/2 first step", "  made one\n  and two\n", "2/2 second", "  three\n", "done in"):
        assert text in result.output, result.output
    assert str(tmp_path / "demo.tar.gz") in result.output.replace("\n", "")


def test_generating_in_the_demo_reports_progress(monkeypatch, tmp_path, tiny_base, trained_adapter):
    # step 4 generated six images in silence (287 s in the report); now each denoising
    # step is reported, and the CLI draws it as a bar
    from avatarforge.demos import local
    from avatarforge.generate import GenArgs

    monkeypatch.setattr(local, "DEMO_ARGS", GenArgs(steps=2, height=64, width=64, seed=7))
    heard = []
    state = local.DemoState(out=tmp_path, base=tiny_base, adapter=trained_adapter,
                            progress=lambda *a: heard.append(a))  # fmt: skip
    local._step_generate_local(state)
    total = 2 * len(PROMPTS) * 2  # before and after, denoising steps
    counted = [(done, of) for done, of, _ in heard if of]
    assert counted == [(i, total) for i in range(1, total + 1)]
    assert heard[-1][2] == f"adapter: image {len(PROMPTS)} of {len(PROMPTS)}"


@pytest.mark.integration
@pytest.mark.slow
def test_demo_service_serves_the_jobs_tarball_from_s3(tmp_path: Path, tiny_base) -> None:
    steps: list[str] = []
    demo = service.run_service_demo(
        local_instance_env(tiny_base.path, tmp_path / "shared"),
        tmp_path / "demo",
        train_defaults=SERVICE_TRAIN,
        on_step=lambda i, title: steps.append(title),
    )
    assert len(steps) == 4
    result = json.loads((demo.out / "result.json").read_text())
    assert result["status"] == "succeeded" and result["user"] == service.DEMO_USER
    # the MME loaded the TargetModel from the prefix the job wrote it under
    assert demo.measured["mme"]["source"] + result["target_model"] == result["model_uri"]
    assert len(demo.images) == 3
    for path in demo.images:
        with Image.open(path) as image:
            assert image.size == (256, 256)
    assert (demo.out / "contact_sheet.png").is_file()
    summary = json.loads((demo.out / "demo_service.json").read_text())
    assert summary["result"] == result and summary["measured"]["mme"]["first_request_s"] > 0


CLOUD_ARGS = {"steps": 2, "height": 64, "width": 64, "seed": 7}
CLOUD_PROMPTS = ("a photo of <<TOK>> person", "an oil painting of <<TOK>> person")


@pytest.mark.integration
@pytest.mark.slow
def test_demo_cloud_runs_submit_to_generate(tiny_base, tmp_path) -> None:
    settings = stack_service(tiny_base.path, tmp_path)
    env = local_instance_env(tiny_base.path, tmp_path / "mme-shared")
    done: list[int] = []
    demo = cloud.run_demo_cloud(
        env,
        tmp_path / "demo",
        service=settings,
        prompts=CLOUD_PROMPTS,
        gen_args=CLOUD_ARGS,
        on_done=lambda i, what, seconds: done.append(i),
    )
    assert done == list(range(1, len(cloud.STEPS) + 1))
    sub = demo.submission
    # the notification came from the success topic through SQS, for this job
    assert demo.notification["invocationStatus"] == "Completed"
    assert demo.notification["inferenceId"] == sub.inference_id == sub.job_id
    assert demo.notification["responseParameters"]["outputLocation"] == sub.output_location
    result = demo.status.result
    assert demo.status.state == "succeeded"
    assert result["model_uri"] == f"{demo.config.models_prefix}{cloud.DEMO_USER}.tar.gz"
    assert result["steps"] == FIXTURE_TRAIN["steps"] and result["photos"]["kept"]
    # images: one JPEG per prompt, as the endpoint sent them, different prompts differ
    assert [len(paths) for paths in demo.images] == [1, 1]
    jpegs = [paths[0].read_bytes() for paths in demo.images]
    assert all(data.startswith(b"\xff\xd8\xff") for data in jpegs) and jpegs[0] != jpegs[1]
    with Image.open(demo.images[0][0]) as image:
        assert image.size == (64, 64)
    # the first request met a loading model and was retried; the runtime saw it all
    ops = [(r.operation, r.error_code or r.status) for r in demo.runtime.requests()]
    assert ops[0] == ("InvokeEndpointAsync", 202)
    assert ("InvokeEndpoint", "ModelNotReadyException") in ops
    assert ops[-2:] == [("InvokeEndpoint", 200)] * 2
    summary = json.loads((demo.out / "demo_cloud.json").read_text())
    assert summary["result"] == result and len(summary["images"]) == 2
    assert (demo.out / "contact_sheet.png").is_file()
    assert set(summary["measured"]["step_s"]) == {title for title, _ in cloud.STEPS}


@pytest.mark.integration
@pytest.mark.slow
def test_the_readme_python_api_example_runs_as_written(repo_root, tiny_base, tmp_path) -> None:
    # README.md's Python example for an app's backend, its text as it stands (read by its
    # marker, nothing in it replaced), run against the deployment `make demo-cloud` runs here:
    # moto (S3, SNS, SQS), the real training service behind the local async endpoint, the MME on
    # the real tritonserver, the local SageMaker runtime. What the example reads, the test
    # writes where it looks: deploy.json (the local stack's name, bucket and region) and
    # selfies/alice (the sample selfies). The service trains with the tests' small settings.
    import subprocess
    import sys

    from fixtures.markdown import block_run_by

    from avatarforge.testing.samples import write_samples

    readme = (repo_root / "README.md").read_text()
    block = block_run_by(readme, "test_the_readme_python_api_example_runs_as_written")
    assert block.lang == "python"
    settings = stack_service(tiny_base.path, tmp_path)
    env = local_instance_env(tiny_base.path, tmp_path / "mme-shared")
    app = tmp_path / "app"
    write_samples(app / "selfies" / "alice")
    (app / "example.py").write_text(block.text)
    with cloud.local_stack(env, tmp_path / "stack", service=settings) as stack:
        config = stack.config
        deployment = {"name": config.name, "bucket": config.bucket, "region": config.region}
        (app / "deploy.json").write_text(json.dumps(deployment))
        # boto3 of the example finds moto and the runtime in the environment local_stack set
        run = subprocess.run(
            [sys.executable, "example.py"], cwd=app, capture_output=True, text=True, timeout=900
        )
        ops = [(r.operation, r.error_code or r.status) for r in stack.runtime.requests()]
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("training alice-"), run.stdout
    assert f"model {config.models_prefix}alice.tar.gz" in run.stdout
    (jpeg,) = app.glob("alice-*.jpg")  # one prompt, one image, as the endpoint sent it
    with Image.open(jpeg) as image:
        assert image.format == "JPEG" and image.size == (256, 256)  # the tiny base's on a CPU
    assert ops[0] == ("InvokeEndpointAsync", 202) and ops[-1] == ("InvokeEndpoint", 200)
