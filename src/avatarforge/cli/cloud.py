"""`avatarforge submit`, `avatarforge status` and `avatarforge demo-cloud`: the client of a
deployed avatarforge (and the whole system on this machine).

The deployment comes from ``--config deploy.json`` (the file `avatarforge deploy` reads) with
``--bucket/--region/--name/--prefix`` overriding it; boto3 finds credentials and endpoints as
usual (``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from .common import console, fail, step_printers

EXIT_FAILED = 1
EXIT_PENDING = 3  # not done yet: try again later (or --wait longer)

CONFIG_HELP = "deployment description (JSON of DeployConfig fields, as for `avatarforge deploy`)"


def deploy_config(
    config: Path | None,
    bucket: str | None = None,
    region: str | None = None,
    name: str | None = None,
    prefix: str | None = None,
    *,
    need_bucket: bool = True,
):
    """The --config file's DeployConfig with the options given on the command line on top."""
    from ..deploy.config import DeployConfig

    data: dict[str, Any] = {}
    if config is not None:
        try:
            data = json.loads(Path(config).read_text())
        except (OSError, ValueError) as exc:
            fail(f"--config {config}: {exc}")
        if not isinstance(data, dict):
            fail(f"--config {config}: must hold a JSON object of deploy settings")
    given = {"bucket": bucket, "region": region, "name": name, "prefix": prefix}
    data.update({k: v for k, v in given.items() if v is not None})
    try:
        result = DeployConfig.from_dict(data)
    except TypeError as exc:
        fail(str(exc))
    if need_bucket and not result.bucket:
        fail("no bucket: give --bucket or --config deploy.json (the deployment's bucket)", code=2)
    return result


def endpoint_target(endpoint: str, user: str, config: Path | None, region: str | None):
    """The user's model on SageMaker endpoint ``endpoint`` as a Generate (retries printed),
    and a line saying where it is."""
    from ..packs import targets

    deployment = deploy_config(config, region=region, need_bucket=False)
    # the models prefix tells "no model yet" apart from other errors; without --config or
    # --region, boto3's own region (AWS_REGION, the profile) is used
    prefix = deployment.models_prefix if deployment.bucket else None
    region = region or (deployment.region if config else None)

    def waiting(reason: str, seconds: float) -> None:
        console.print(f"[dim]{reason}: retrying in {seconds:.1f} s[/]")

    generate = targets.endpoint(
        endpoint, user, region=region, models_prefix=prefix, on_retry=waiting
    )
    return generate, f"endpoint {endpoint}, TargetModel {user}.tar.gz"


def _json_option(text: str | None, flag: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        fail(f"{flag}: not valid JSON ({exc})", code=2)
    if not isinstance(value, dict):
        fail(f"{flag}: must be a JSON object of settings", code=2)
    return value


def submit(
    user: str = typer.Option(..., "--user", help="the user id (becomes <user>.tar.gz)"),
    photos: str = typer.Option(
        ..., "--photos", help="a local folder of selfies, or an s3:// prefix (used in place)"
    ),
    job_id: str = typer.Option(
        None, "--job-id", help="job id (default: <user>-<time>-<hex>); the same id resumes a job"
    ),
    train: str = typer.Option(None, "--train", help="training overrides, e.g. '{\"steps\": 800}'"),
    preprocess: str = typer.Option(None, "--preprocess", help="preprocessing overrides (JSON)"),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    bucket: str = typer.Option(None, "--bucket", help="the deployment's S3 bucket"),
    region: str = typer.Option(None, "--region", help="AWS region"),
    name: str = typer.Option(None, "--name", help="deployment name (prefix of endpoint names)"),
    prefix: str = typer.Option(None, "--prefix", help="key prefix in the bucket"),
) -> None:
    """Upload photos and start a training job on the async training endpoint."""
    from ..cloud import submit as submit_job

    deployment = deploy_config(config, bucket, region, name, prefix)
    overrides = {"train": _json_option(train, "--train")}
    overrides["preprocess"] = _json_option(preprocess, "--preprocess")
    try:
        sub = submit_job(deployment, user, photos, job_id=job_id, overrides=overrides)
    except ValueError as exc:  # e.g. a malformed s3:// URI
        fail(str(exc))
    console.print(f"job      [bold]{sub.job_id}[/] (user {sub.user}, endpoint {sub.endpoint})")
    console.print(f"photos   {sub.photos}")
    console.print(f"request  {sub.input_location}")
    console.print(f"output   {sub.output_location}")
    console.print(f"failure  {sub.failure_location}")
    console.print(f"next: avatarforge status {sub.job_id} --wait 3600" + _where(config, bucket))


def _where(config: Path | None, bucket: str | None) -> str:
    if config is not None:
        return f" --config {config}"
    return f" --bucket {bucket}" if bucket else ""


def status(
    job_id: str = typer.Argument(..., help="the job id submit printed"),
    wait: float = typer.Option(
        0.0, "--wait", min=0, help="wait up to this many seconds for the job to end"
    ),
    queue: str = typer.Option(
        None, "--queue", help="SQS queue URL subscribed to the training topics (else poll S3)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the result or failure as JSON"),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    bucket: str = typer.Option(None, "--bucket", help="the deployment's S3 bucket"),
    region: str = typer.Option(None, "--region", help="AWS region"),
    name: str = typer.Option(None, "--name", help="deployment name"),
    prefix: str = typer.Option(None, "--prefix", help="key prefix in the bucket"),
) -> None:
    """A training job's result (photos kept/rejected, steps, timings) or why it failed.

    Exit code 0: succeeded; 1: failed; 3: still pending.
    """
    from ..cloud import status as job_status

    deployment = deploy_config(config, bucket, region, name, prefix)
    found = job_status(deployment, job_id, wait=wait, queue_url=queue)
    if as_json:
        print(json.dumps(found.result or found.failure or {"reason": found.reason}, indent=2))
    else:
        print_status(found)
    if found.state == "failed":
        raise typer.Exit(EXIT_FAILED)
    if found.state == "pending":
        raise typer.Exit(EXIT_PENDING)


def print_status(found) -> None:
    """The job's state as people read it: one table for a result, the reason for a failure."""
    sub = found.submission
    if found.state == "pending":
        console.print(
            f"job [bold]{found.job_id}[/]: [yellow]pending[/] (submitted {sub.submitted_at})"
        )
        console.print(f"  result will be at {sub.output_location}")
        return
    if found.state == "failed":
        console.print(f"job [bold]{found.job_id}[/]: [bold red]failed[/] ({found.source})")
        console.print(f"  reason: {found.reason}", soft_wrap=True)
        if sub.failure_location:
            console.print(f"  details: {sub.failure_location}")
        return
    result = found.result or {}
    console.print(f"job [bold]{found.job_id}[/]: [bold green]succeeded[/] ({found.source})")
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_row("model", f"{result.get('target_model')}  {result.get('model_uri', '')}")
    photos = result.get("photos") or {}
    kept, rejected = photos.get("kept") or [], photos.get("rejected") or []
    table.add_row("photos kept", f"{len(kept)}: {', '.join(map(str, kept))}")
    table.add_row("photos rejected", str(len(rejected)))
    for item in rejected:
        table.add_row("", f"{item.get('source')}: {item.get('reason')}")
    resumed = result.get("resumed_from")
    steps = f"{result.get('steps')}" + (f" (resumed from step {resumed})" if resumed else "")
    table.add_row("steps", steps)
    seconds = result.get("seconds") or {}
    table.add_row("seconds", ", ".join(f"{k} {v:.1f}" for k, v in seconds.items() if _num(v)))
    if "tarball_bytes" in result:
        table.add_row("tarball", f"{result['tarball_bytes'] / 1024:.0f} KiB")
    console.print(table)
    console.print(
        f"next: avatarforge generate --endpoint ENDPOINT --user {result.get('user', '')} "
        "--prompt 'a photo of <<TOK>> person'"
    )


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def demo_cloud(
    out: Path = typer.Option(None, help="output folder (default: build/demo-cloud)"),
) -> None:
    """The whole system on this machine: selfies -> submit -> SNS -> status -> generate.

    moto plays S3/SNS/SQS; a local SageMaker runtime serves the async training endpoint (the
    real training service) and the multi-model endpoint (tritonserver). Images, the job's result
    and a contact sheet land in build/demo-cloud/; a few minutes on a 2-core CPU.
    """
    import logging
    import time

    from ..demos.cloud import STEPS, run_demo_cloud
    from ..paths import build_dir
    from .servers import instance_env, stop_on_sigterm

    stop_on_sigterm()  # tritonserver and moto are stopped on any exit
    logging.getLogger("botocore").setLevel(logging.WARNING)  # one line per client made
    root = (out or build_dir() / "demo-cloud").resolve()
    env = instance_env("tiny", root / "mme" / "shared")
    began = time.perf_counter()

    on_step, on_done = step_printers(len(STEPS))

    try:
        run_demo_cloud(env, root, on_step=on_step, on_done=on_done)
    except KeyboardInterrupt:
        fail("interrupted")
    except Exception as exc:  # a clear line, not a traceback; the logs hold the detail
        fail(f"demo-cloud failed: {type(exc).__name__}: {exc}")
    console.rule(f"[bold green]done[/] in {time.perf_counter() - began:.0f} s")
    console.print(f"  the job's result   {root / 'result.json'}")
    console.print(f"  generated images   {root / 'images'}")
    console.print(f"  contact sheet      {root / 'contact_sheet.png'}")
    console.print(f"  what happened      {root / 'demo_cloud.json'}")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("submit")(submit)
    app.command("status")(status)
    app.command("demo-cloud")(demo_cloud)
