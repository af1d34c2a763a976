"""`make demo-cloud`: the whole deployed system on this machine, driven by the cloud client.

- a moto server plays S3, SNS and SQS: the deployment's bucket, its two training topics and an
  SQS queue subscribed to both;
- the local SageMaker runtime (:mod:`avatarforge.cloud.local_runtime`) serves the
  deployment's two endpoints: the async training endpoint, an
  :class:`~avatarforge.cloud.async_runner.AsyncRunner` around the training service's
  :func:`avatarforge.jobs.handle_invocation` (small CPU settings), and the multi-model
  endpoint, tritonserver's SageMaker front end + the TargetModel loader fed from the models
  prefix in moto S3 (answering ModelNotReadyException while a user model loads);
- the client (:mod:`avatarforge.cloud.client`) does what a user does: sample selfies -> submit
  -> the SNS notification arrives in SQS -> status -> generate for a few prompts -> the JPEGs
  as sent and a contact sheet under ``build/demo-cloud/``.

The client and the handler are the real ones; only AWS is replaced (moto, the runtime). Steps
report what they did through ``on_step``/``on_done``; this module prints nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..deploy.config import DeployConfig
from ..paths import build_dir
from ..testing.aws_local import environ
from .steps import run_steps

DEMO_USER = "demo"
QUEUE_NAME = "avatarforge-demo-jobs"
# SageMaker answers within 60 s on a GPU; a busy 2-core CPU can take longer for one image, so
# the local endpoint and the client wait longer here (the only setting the demo relaxes).
CPU_INVOKE_TIMEOUT_S = 600.0


@dataclass
class CloudDemo:
    out: Path
    mme_env: dict[str, str]  # the MME instance's environment (shared dir, base source)
    service: Any  # the training service's ServiceConfig
    prompts: tuple[str, ...]
    gen_args: dict[str, Any]
    config: DeployConfig = field(
        default_factory=lambda: DeployConfig(name="avatarforge", bucket="avatarforge-demo-cloud")
    )
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    topics: tuple[str, str] = ("", "")
    queue_url: str = ""
    runtime: Any = None  # LocalRuntime
    runner: Any = None  # AsyncRunner
    photos: list[Path] = field(default_factory=list)
    submission: Any = None  # Submission
    notification: dict[str, Any] = field(default_factory=dict)
    status: Any = None  # JobStatus
    images: list[list[Path]] = field(default_factory=list)  # per prompt
    measured: dict[str, Any] = field(default_factory=dict)
    sagemaker_url: str = ""  # the MME's tritonserver SageMaker front end (forget unloads there)


def _step_aws(demo: CloudDemo) -> str:
    import boto3

    from ..cloud.queue import subscribe_queue

    config = demo.config
    boto3.client("s3").create_bucket(Bucket=config.bucket)
    sns, sqs = boto3.client("sns"), boto3.client("sqs")
    demo.topics = (
        sns.create_topic(Name=config.success_topic_name)["TopicArn"],
        sns.create_topic(Name=config.error_topic_name)["TopicArn"],
    )
    demo.queue_url = subscribe_queue(sns, sqs, QUEUE_NAME, list(demo.topics))
    return (
        f"bucket s3://{config.bucket}/{config.prefix}, topics {config.success_topic_name} and "
        f"{config.error_topic_name}, queue {QUEUE_NAME} subscribed to both"
    )


def _step_runtime(demo: CloudDemo) -> str:
    from ..cloud.async_runner import AsyncEndpointConfig, AsyncRunner
    from ..cloud.local_runtime import local_runtime
    from ..jobs import handle_invocation
    from ..mme import MMEConfig, MultiModelLoader
    from ..mme.front import Invoker
    from ..tritonserver.sagemaker import sagemaker_triton

    config, stack = demo.config, demo.stack
    # the deployment's prefix, as deploy gives it to the training container
    service = dataclasses.replace(demo.service, s3_prefix=config.s3(""))

    def train(body: bytes, content_type: str | None) -> bytes:
        return handle_invocation(body, content_type, service)

    endpoint = AsyncEndpointConfig.for_deployment(config, *demo.topics)
    demo.runner = stack.enter_context(AsyncRunner(endpoint, train))
    # the instance's environment: where the models find the shared files, and S3 (moto)
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    server = stack.enter_context(
        sagemaker_triton(demo.out / "mme", extra_env={**aws, **demo.mme_env})
    )
    root = demo.out / "mme" / "models"  # plays /opt/ml/models
    mme_config = MMEConfig(invoke_timeout_s=CPU_INVOKE_TIMEOUT_S)
    loader = MultiModelLoader(server.sagemaker_url, config.models_prefix, root, mme_config)
    stack.callback(loader.unload_all)
    invoker = Invoker(loader, not_ready_while_loading=True)
    stack.callback(invoker.close)
    demo.runtime = stack.enter_context(
        local_runtime(
            {config.mme_endpoint_name: invoker}, {config.training_endpoint_name: demo.runner}
        )
    )
    stack.enter_context(environ(dict(demo.runtime.env())))
    demo.measured["tritonserver_start_s"] = round(server.start_seconds, 2)
    demo.sagemaker_url = server.sagemaker_url
    return (
        f"SageMaker runtime at {demo.runtime.url}: {config.training_endpoint_name} (async, "
        f"{endpoint.max_concurrent} at once) and {config.mme_endpoint_name} (MME, TargetModels "
        f"from {config.models_prefix}; tritonserver up in {server.start_seconds:.1f} s)"
    )


def _step_photos(demo: CloudDemo) -> str:
    from ..testing.samples import write_samples

    demo.photos = write_samples(demo.out / "photos")
    size = sum(p.stat().st_size for p in demo.photos)
    return f"{len(demo.photos)} sample selfies ({size / 2**20:.1f} MiB) in {demo.out / 'photos'}"


def _step_submit(demo: CloudDemo) -> str:
    from ..cloud.client import submit

    sub = demo.submission = submit(demo.config, DEMO_USER, demo.out / "photos")
    return (
        f"job {sub.job_id}: photos uploaded to {sub.photos}, request {sub.input_location}\n"
        f"endpoint answered: output {sub.output_location}, failure {sub.failure_location}\n"
        f"(avatarforge submit --user {DEMO_USER} --photos {demo.out / 'photos'} --bucket "
        f"{demo.config.bucket})"
    )


def _step_notification(demo: CloudDemo) -> str:
    import boto3

    from ..cloud.client import CloudError
    from ..cloud.queue import wait_for_notification

    sub = demo.submission
    started = time.perf_counter()
    note = wait_for_notification(boto3.client("sqs"), demo.queue_url, sub.inference_id, 3600)
    if note is None:
        raise CloudError(f"no notification for job {sub.job_id} within an hour")
    demo.notification = note.raw
    demo.measured["job_s"] = round(time.perf_counter() - started, 1)
    where = note.output_location if note.succeeded else note.failure_reason
    return f"{note.raw['invocationStatus']} for inferenceId {note.inference_id}: {where}"


def _step_status(demo: CloudDemo) -> str:
    from ..cloud.client import CloudError, status

    found = demo.status = status(demo.config, demo.submission.job_id)
    if found.state != "succeeded":
        raise CloudError(f"job {found.job_id} {found.state}: {found.reason}")
    result = found.result
    (demo.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    photos = result["photos"]
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items())
    rejected = "; ".join(f"{r['source']}: {r['reason']}" for r in photos["rejected"]) or "none"
    return (
        f"{result['model_uri']} ({result['tarball_bytes'] / 1024:.0f} KiB), {result['steps']} "
        f"steps\nphotos kept {len(photos['kept'])}, rejected {len(photos['rejected'])} "
        f"({rejected})\n{seconds}"
    )


def _step_generate(demo: CloudDemo) -> str:
    from ..cloud.client import RetryPolicy, generate

    folder = demo.out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.jpg"):
        old.unlink()  # this run's images only
    retries: list[float] = []
    timings = []
    for i, prompt in enumerate(demo.prompts):
        started = time.perf_counter()
        images = generate(
            demo.config,
            DEMO_USER,
            prompt,
            gen_args=demo.gen_args,
            retry=RetryPolicy(read_timeout_s=CPU_INVOKE_TIMEOUT_S + 10),
            on_retry=lambda _reason, seconds: retries.append(seconds),
        )
        timings.append(time.perf_counter() - started)
        paths = []
        for j, jpeg in enumerate(images):
            path = folder / f"{i}-{j}.jpg"
            path.write_bytes(jpeg)  # as the endpoint sent it
            paths.append(path)
        demo.images.append(paths)
    not_ready = sum(1 for r in demo.runtime.requests() if r.error_code == "ModelNotReadyException")
    warm = sum(timings[1:]) / max(1, len(timings) - 1)
    demo.measured.update(
        first_generate_s=round(timings[0], 2),
        warm_generate_s=round(warm, 2),
        model_not_ready_answers=not_ready,
        backoff_waits_s=[round(w, 2) for w in retries],
    )
    return (
        f"{sum(len(p) for p in demo.images)} images in {folder}\nfirst request {timings[0]:.1f} s: "
        f"{not_ready} ModelNotReadyException answers while {DEMO_USER}.tar.gz loaded, "
        f"{sum(retries):.1f} s of backoff in {len(retries)} waits; then {warm:.1f} s per prompt"
    )


def _step_contact_sheet(demo: CloudDemo) -> str:
    from ..imaging import contact_sheet

    generated = [path for paths in demo.images for path in paths]
    sheet = contact_sheet(
        [demo.photos[:4], generated],
        ["the selfies submitted (first 4)", " | ".join(demo.prompts)],
        cell=192,
        title=f"avatarforge demo-cloud: submit -> {demo.config.training_endpoint_name} -> SNS/SQS "
        f"-> {demo.config.mme_endpoint_name}",
    )
    path = demo.out / "contact_sheet.png"
    sheet.save(path)
    return str(path)


def _write_summary(demo: CloudDemo) -> Path:
    """demo_cloud.json: what was submitted, notified, returned and measured."""
    summary = {
        "submission": demo.submission.to_dict(),
        "notification": demo.notification,
        "result": demo.status.result,
        "images": [str(p) for paths in demo.images for p in paths],
        "measured": demo.measured,
        "runtime_requests": [dataclasses.asdict(r) for r in demo.runtime.requests()],
    }
    path = demo.out / "demo_cloud.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


STEPS: tuple[tuple[str, Callable[[CloudDemo], str]], ...] = (
    ("moto: the deployment's bucket, SNS topics and a subscribed SQS queue", _step_aws),
    ("the local SageMaker runtime: async training endpoint + MME (tritonserver)", _step_runtime),
    ("write the sample selfies", _step_photos),
    ("submit: upload, request.json, InvokeEndpointAsync", _step_submit),
    ("the job runs; wait for its SNS notification in SQS", _step_notification),
    ("status: the job's result from S3", _step_status),
    ("generate: InvokeEndpoint with TargetModel=demo.tar.gz", _step_generate),
    ("draw the contact sheet", _step_contact_sheet),
)


@contextlib.contextmanager
def local_stack(
    mme_env: dict[str, str], out: Path | None = None, *, service: Any = None
) -> Iterator[CloudDemo]:
    """The deployment ``make demo-cloud`` runs, without its client's steps, for the block:
    moto (the bucket, topics and a subscribed queue), the async training endpoint and the MME
    on the local SageMaker runtime, boto3 of this process pointed at them. Every server is
    stopped after. What ``avatarforge api`` serves when no deployment is named."""
    from ..testing.aws_local import dummy_aws_env, moto_server

    out = (out or build_dir() / "api").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if service is None:
        from .service import service_config

        service = service_config(out)
    demo = CloudDemo(out=out, mme_env=mme_env, service=service, prompts=(), gen_args={})
    with demo.stack as stack:
        endpoint = stack.enter_context(moto_server(log_path=out / "moto_server.log"))
        masked: dict[str, str | None] = {k: None for k in os.environ if k.startswith("AWS_")}
        stack.enter_context(environ({**masked, **dummy_aws_env(endpoint)}))
        _step_aws(demo)
        _step_runtime(demo)
        yield demo


def run_demo_cloud(
    mme_env: dict[str, str],
    out: Path | None = None,
    *,
    service: Any = None,
    prompts: tuple[str, ...] | None = None,
    gen_args: dict[str, Any] | None = None,
    on_step: Callable[[int, str], None] | None = None,
    on_done: Callable[[int, str, float], None] | None = None,
) -> CloudDemo:
    """Run every step into ``out`` (default build/demo-cloud); every server is stopped after.

    ``service``: the training service's ServiceConfig (default: the demo's small CPU settings);
    ``on_step(i, title)`` before each step, ``on_done(i, what, seconds)`` after it.
    """
    from ..testing.aws_local import dummy_aws_env, moto_server
    from .local import DEMO_ARGS, PROMPTS

    out = (out or build_dir() / "demo-cloud").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if service is None:
        from .service import service_config

        service = service_config(out)
    demo = CloudDemo(
        out=out,
        mme_env=mme_env,
        service=service,
        prompts=tuple(prompts or PROMPTS),
        gen_args=dict(gen_args or DEMO_ARGS.to_dict()),
    )
    began = time.perf_counter()
    with demo.stack as stack:  # closed in reverse: the runtime and servers, then moto
        endpoint = stack.enter_context(moto_server(log_path=out / "moto_server.log"))
        # boto3 in this process (and the servers it starts) talks to moto with dummy
        # credentials, whatever AWS settings the caller has; the runtime's variable is added
        # once it listens
        masked: dict[str, str | None] = {k: None for k in os.environ if k.startswith("AWS_")}
        stack.enter_context(environ({**masked, **dummy_aws_env(endpoint)}))
        seconds = run_steps(STEPS, demo, on_step, on_done)
        demo.measured["step_s"] = {title: round(s, 2) for title, s in seconds.items()}
        demo.measured["total_s"] = round(time.perf_counter() - began, 1)
        _write_summary(demo)
    return demo
