"""`avatarforge job run|validate` and `avatarforge demo-service`: the training service by hand.

`job run` runs one job here exactly as the training endpoint would (same request, same
settings from ``AVATARFORGE_SERVICE_*``, same S3 objects); `job validate` only parses.
Exit codes of `job run`: 0 done, 1 our failure, 2 the request's fault, 3 deadline reached
(re-submit the same job id to resume).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer
from rich.console import Console

from .common import console, fail, step_printers

job_app = typer.Typer(
    help="Training jobs of the service: run one against S3 here, or validate a request. "
    "Service settings come from AVATARFORGE_SERVICE_<FIELD> variables.",
    no_args_is_help=True,
)
progress = Console(stderr=True)  # stdout carries the result JSON only


def _read_request(source: str) -> bytes:
    """The request's bytes from a file, '-' (stdin) or an s3:// URI."""
    import sys

    from ..jobs.request import MAX_REQUEST_BYTES

    if source == "-":
        return sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1)
    if source.startswith("s3://"):
        from .. import storage

        try:
            (info,) = storage.head_objects([source])
            if info.size > MAX_REQUEST_BYTES:
                fail(f"{source}: {info.size} bytes, more than {MAX_REQUEST_BYTES}", 2)
            with tempfile.TemporaryDirectory(prefix="avatarforge-request-") as tmp:
                return storage.fetch(source, Path(tmp) / "request.json").read_bytes()
        except storage.StorageError as exc:
            fail(str(exc), 2)
    path = Path(source)
    if not path.is_file():
        fail(f"{source}: no such request file", 2)
    return path.read_bytes()[: MAX_REQUEST_BYTES + 1]


def _config():
    from ..jobs import ServiceConfig

    return ServiceConfig.from_env()


def _print_event(event) -> None:
    data = event.data
    if event.kind == "stage":
        progress.print(f"  {data['name']:<10} {data['seconds']:7.1f} s")
    elif event.kind == "waiting_for_slot":
        progress.print("  all training slots are busy: waiting for one")
    elif event.kind == "waiting_for_job":
        progress.print("  this job id is running in another process here: waiting for it")
    elif event.kind == "resumed":
        progress.print(f"  resuming from the checkpoint of step {data['step']}")
    elif event.kind == "checkpoint":
        progress.print(f"  checkpoint of step {data['step']} saved to {data['uri']}")
    elif event.kind == "reused":
        progress.print("  this job id already succeeded: its stored result, nothing trained")


@job_app.command("run")
def run(
    request: str = typer.Argument(..., help="the request: a JSON file, '-' (stdin) or s3:// URI"),
) -> None:
    """Run one training job here against S3; print its result JSON (stdout)."""
    from ..jobs import JobError, JobTimeoutError, parse_request, run_job

    config = _config()
    try:
        parsed = parse_request(_read_request(request), config)
    except JobError as exc:
        fail(str(exc), 2)
    progress.print(
        f"job [bold]{parsed.job_id}[/] for user [bold]{parsed.user}[/]: "
        f"{parsed.photos if isinstance(parsed.photos, str) else len(parsed.photos)} -> "
        f"{parsed.model_uri}"
    )
    try:
        result = run_job(parsed, config, on_event=_print_event)
    except JobTimeoutError as exc:
        fail(str(exc), 3)
    except JobError as exc:
        fail(str(exc), 2 if exc.client_fault else 1)
    progress.print(f"[green]done[/]: {result.model_uri} ({result.tarball_bytes} bytes)")
    print(json.dumps(result.to_dict(), indent=2))


@job_app.command("validate")
def validate(
    request: str = typer.Argument(..., help="the request: a JSON file, '-' (stdin) or s3:// URI"),
) -> None:
    """Parse a request as the service would; print it normalised, or the error."""
    from ..jobs import JobError, parse_request

    config = _config()
    try:
        parsed = parse_request(_read_request(request), config)
    except JobError as exc:
        fail(str(exc), 2)
    print(json.dumps(parsed.to_dict(), indent=2))


def demo_service(
    out: Path = typer.Option(None, help="output folder (default: build/demo-service)"),
) -> None:
    """One training job against a local S3 (moto), then its tarball served by the local MME.

    Uploads the sample selfies, runs the job through the service's handler with small CPU
    settings, serves <user>.tar.gz from the S3 key the job wrote through tritonserver's
    SageMaker front end, and draws a contact sheet. A few minutes on a 2-core CPU.
    """
    import logging
    import time

    from ..demos.service import STEPS as SERVICE_STEPS
    from ..demos.service import run_service_demo
    from .servers import instance_env, stop_on_sigterm

    stop_on_sigterm()  # tritonserver and moto are stopped on any exit
    logging.getLogger("botocore").setLevel(logging.WARNING)  # "found credentials" per client
    root = (out or _default_out()).resolve()
    env = instance_env("tiny", root / "mme" / "shared")
    began = time.perf_counter()
    on_step, on_done = step_printers(len(SERVICE_STEPS))

    try:
        demo = run_service_demo(env, root, on_step=on_step, on_done=on_done)
    except KeyboardInterrupt:
        fail("interrupted")
    except Exception as exc:  # a clear line, not a traceback; the logs hold the detail
        from ..jobs import JobError

        kind = "" if isinstance(exc, JobError | OSError) else f"{type(exc).__name__}: "
        fail(f"demo-service failed: {kind}{exc}")
    console.rule(f"[bold green]done[/] in {time.perf_counter() - began:.0f} s")
    console.print(f"  the job's result    {demo.out / 'result.json'}")
    console.print(f"  generated images    {demo.out / 'images'}")
    console.print(f"  contact sheet       {demo.out / 'contact_sheet.png'}")


def _default_out() -> Path:
    from ..paths import build_dir

    return build_dir() / "demo-service"


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.add_typer(job_app, name="job")
    app.command("demo-service")(demo_service)
