"""The whole system on this machine, as `make demo-cloud` runs it, with tiny settings: moto
S3/SNS/SQS, the real training service (:func:`avatarforge.jobs.handle_invocation`) behind the
local async runner, the real tritonserver MME fed from the models prefix the job wrote, and
the cloud client driving it: sample selfies -> submit -> SNS notification in SQS -> status ->
generate (SD user package on the tiny base) -> JPEGs and a contact sheet."""

from __future__ import annotations

import json

import pytest
from fixtures.train import FIXTURE_TRAIN
from PIL import Image

from avatarforge.demos.cloud import DEMO_USER, STEPS, run_demo_cloud
from avatarforge.jobs import ServiceConfig
from avatarforge.serving.config import local_instance_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL_ARGS = {"steps": 2, "height": 64, "width": 64, "seed": 7}
PROMPTS = ("a photo of <<TOK>> person", "an oil painting of <<TOK>> person")


def test_demo_cloud_runs_submit_to_generate(tiny_base, tmp_path) -> None:
    train = {k: v for k, v in FIXTURE_TRAIN.items() if k != "progress"}  # the job sets it
    service = ServiceConfig(
        base_source=str(tiny_base.path),
        work_dir=str(tmp_path / "service" / "work"),
        slots_dir=str(tmp_path / "service" / "slots"),
        shared_dir=str(tmp_path / "service" / "shared"),
        train_defaults=train,
        preprocess_defaults={"backgrounds": 0},
    )
    env = local_instance_env(tiny_base.path, tmp_path / "mme-shared")
    done: list[int] = []
    demo = run_demo_cloud(
        env,
        tmp_path / "demo",
        service=service,
        prompts=PROMPTS,
        gen_args=SMALL_ARGS,
        on_done=lambda i, what, seconds: done.append(i),
    )
    assert done == list(range(1, len(STEPS) + 1))
    sub = demo.submission
    # the notification came from the success topic through SQS, for this job
    assert demo.notification["invocationStatus"] == "Completed"
    assert demo.notification["inferenceId"] == sub.inference_id == sub.job_id
    assert demo.notification["responseParameters"]["outputLocation"] == sub.output_location
    result = demo.status.result
    assert demo.status.state == "succeeded"
    assert result["model_uri"] == f"{demo.config.models_prefix}{DEMO_USER}.tar.gz"
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
    assert set(summary["measured"]["step_s"]) == {title for title, _ in STEPS}
