"""`make demo-service`: one job against moto S3, then the local MME serves the tarball the job
wrote, from its S3 key, and generates with it (tiny training settings here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.jobs import SERVICE_TRAIN
from PIL import Image

from avatarforge.demos.service import DEMO_USER, run_service_demo
from avatarforge.serving.config import local_instance_env


@pytest.mark.integration
@pytest.mark.slow
def test_demo_service_serves_the_jobs_tarball_from_s3(tmp_path: Path, tiny_base) -> None:
    steps: list[str] = []
    demo = run_service_demo(
        local_instance_env(tiny_base.path, tmp_path / "shared"),
        tmp_path / "demo",
        train_defaults=SERVICE_TRAIN,
        on_step=lambda i, title: steps.append(title),
    )
    assert len(steps) == 4
    result = json.loads((demo.out / "result.json").read_text())
    assert result["status"] == "succeeded" and result["user"] == DEMO_USER
    # the MME loaded the TargetModel from the prefix the job wrote it under
    assert demo.measured["mme"]["source"] + result["target_model"] == result["model_uri"]
    assert len(demo.images) == 3
    for path in demo.images:
        with Image.open(path) as image:
            assert image.size == (256, 256)
    assert (demo.out / "contact_sheet.png").is_file()
    summary = json.loads((demo.out / "demo_service.json").read_text())
    assert summary["result"] == result and summary["measured"]["mme"]["first_request_s"] > 0
