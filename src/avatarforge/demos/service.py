"""`make demo-service`: one training job against a local S3, then its model served by the MME.

A moto server plays S3; the sample selfies are uploaded under a photo prefix; the job runs
through :func:`~avatarforge.jobs.handle_invocation` (the same call the DJL entry point makes)
with small CPU settings; then the local SageMaker MME (tritonserver's SageMaker front end + the
TargetModel loader) serves ``<user>.tar.gz`` from the very S3 key the job wrote, and images are
generated through it. Results land in ``build/demo-service/``.

The steps report what they measured through ``on_step``; this module prints nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..jobs.config import ServiceConfig
from ..paths import build_dir
from .steps import run_steps

BUCKET = "avatarforge-demo"
PREFIX = "avatarforge/"  # the deployment layout: photos/, models/, jobs/ under one prefix
DEMO_USER = "demo"
DEMO_JOB = "demo-service-1"


@dataclass
class ServiceDemo:
    out: Path
    mme_env: dict[str, str]  # what the user models' ensure-step reads (shared dir, base source)
    train_defaults: dict[str, Any] | None = None  # None: service_config()'s
    endpoint: str = ""
    request: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    images: list[Path] = field(default_factory=list)
    measured: dict[str, Any] = field(default_factory=dict)


def _s3(*parts: str) -> str:
    return f"s3://{BUCKET}/{PREFIX}" + "".join(parts)


def service_config(out: Path, train_defaults: dict[str, Any] | None = None) -> ServiceConfig:
    """Small CPU settings (``make demo``'s): the path, not the quality, is what it shows."""
    from .local import DEMO_TRAIN

    if train_defaults is None:
        # no activation recomputation: it saves GPU memory, and only costs time on a CPU
        train_defaults = {**DEMO_TRAIN, "device": "cpu", "gradient_checkpointing": False}
    return ServiceConfig(
        s3_prefix=_s3(),  # the demo deployment's: photos/, models/, jobs/ under it
        base_source="tiny",
        work_dir=str(out / "service" / "work"),
        slots_dir=str(out / "service" / "slots"),
        shared_dir=str(out / "service" / "shared"),
        train_defaults=train_defaults,
        preprocess_defaults={"backgrounds": 1},
    )


def _upload_photos(demo: ServiceDemo) -> str:
    import boto3

    from .. import storage
    from ..testing.samples import write_samples

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    photos = write_samples(demo.out / "photos")
    prefix = _s3("photos/", DEMO_USER, "/", DEMO_JOB, "/")
    for photo in photos:
        storage.upload(photo, prefix + photo.name)
    size = sum(p.stat().st_size for p in photos)
    demo.measured["photos"] = {"count": len(photos), "bytes": size, "prefix": prefix}
    return f"{len(photos)} photos, {size / 2**20:.1f} MiB, uploaded to {prefix}"


def _run_job(demo: ServiceDemo) -> str:
    from ..jobs.handler import handle_invocation

    demo.request = {
        "job_id": DEMO_JOB,
        "user": DEMO_USER,
        "photos": demo.measured["photos"]["prefix"],
        "models_prefix": _s3("models/"),
    }
    (demo.out / "request.json").write_text(json.dumps(demo.request, indent=2) + "\n")
    config = service_config(demo.out, demo.train_defaults)
    body = handle_invocation(json.dumps(demo.request).encode(), "application/json", config)
    demo.result = json.loads(body)
    (demo.out / "result.json").write_bytes(body)
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in demo.result["seconds"].items())
    return (
        f"{demo.result['model_uri']} ({demo.result['tarball_bytes'] / 1024:.0f} KiB, "
        f"{demo.result['steps']} steps, {len(demo.result['photos']['kept'])} photos kept); "
        f"{seconds}"
    )


def _serve_and_generate(demo: ServiceDemo) -> str:
    from ..mme import MultiModelLoader
    from ..mme.front import mme_front
    from ..mme.generate import generate
    from ..tritonserver.sagemaker import sagemaker_triton
    from .local import DEMO_ARGS, PROMPTS

    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    target = demo.result["target_model"]
    models = _s3("models/")  # the MME's ModelDataUrl: where the job wrote the tarball
    folder = demo.out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    timings = []
    with sagemaker_triton(demo.out / "mme", extra_env={**aws, **demo.mme_env}) as server:
        loader = MultiModelLoader(server.sagemaker_url, models, demo.out / "mme" / "models")
        try:
            with mme_front(loader, port=0) as url:
                for i, prompt in enumerate(PROMPTS):
                    started = time.perf_counter()
                    (image,) = generate(url, target, prompt, None, DEMO_ARGS.to_dict())
                    timings.append(time.perf_counter() - started)
                    image.save(folder / f"{i}.jpg", quality=95)
                    demo.images.append(folder / f"{i}.jpg")
        finally:
            loader.unload_all()
    warm = sum(timings[1:]) / max(1, len(timings) - 1)
    demo.measured["mme"] = {
        "source": models,
        "target_model": target,
        "tritonserver_start_s": round(server.start_seconds, 2),
        "first_request_s": round(timings[0], 2),
        "warm_request_s": round(warm, 2),
        "log": str(server.log_path),
    }
    return (
        f"TargetModel {target} from {models}: tritonserver up in {server.start_seconds:.1f} s, "
        f"first request (fetch + load + generate) {timings[0]:.1f} s, then {warm:.1f} s per image"
    )


def _contact_sheet(demo: ServiceDemo) -> str:
    from ..imaging import contact_sheet
    from .local import PROMPTS

    photos = sorted((demo.out / "photos").iterdir())[:4]
    sheet = contact_sheet(
        [photos, demo.images],
        ["the selfies in S3 (first 4)", " | ".join(PROMPTS)],
        cell=192,
        title=f"avatarforge demo-service: job {DEMO_JOB} -> {demo.result['model_uri']} -> MME",
    )
    path = demo.out / "contact_sheet.png"
    sheet.save(path)
    summary = {
        "request": demo.request,
        "result": demo.result,
        "measured": demo.measured,
        "images": [str(p) for p in demo.images],
        "contact_sheet": str(path),
    }
    (demo.out / "demo_service.json").write_text(json.dumps(summary, indent=2) + "\n")
    return f"{path}; everything measured in {demo.out / 'demo_service.json'}"


STEPS: tuple[tuple[str, Callable[[ServiceDemo], str]], ...] = (
    ("upload the sample selfies to S3 (moto)", _upload_photos),
    ("run the training job (photos -> <user>.tar.gz in the MME prefix)", _run_job),
    ("serve the job's tarball through the local MME and generate", _serve_and_generate),
    ("draw the contact sheet", _contact_sheet),
)


def run_service_demo(
    mme_env: dict[str, str],
    out: Path | None = None,
    *,
    train_defaults: dict[str, Any] | None = None,
    on_step: Callable[[int, str], None] | None = None,
    on_done: Callable[[int, str, float], None] | None = None,
) -> ServiceDemo:
    """Run every step into ``out`` (default build/demo-service); returns what was made.

    ``on_step(i, title)`` before each step, ``on_done(i, what it measured, seconds)`` after;
    ``train_defaults`` replaces the demo's training preset (tests use a smaller one).
    """
    from ..testing.aws_local import dummy_aws_env, environ, moto_server

    demo = ServiceDemo(
        out=(out or build_dir() / "demo-service").resolve(),
        mme_env=mme_env,
        train_defaults=train_defaults,
    )
    demo.out.mkdir(parents=True, exist_ok=True)
    with moto_server(log_path=demo.out / "moto_server.log") as endpoint:
        demo.endpoint = endpoint
        with environ(dummy_aws_env(endpoint)):
            run_steps(STEPS, demo, on_step, on_done)
    return demo
