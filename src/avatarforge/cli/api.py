"""`avatarforge api`: the HTTP API for an app's backend (and its web page), on the local stack
of `make demo-cloud` or on a deployment; `avatarforge api new-key NAME`: a key for it."""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

import typer

from .cloud import CONFIG_HELP
from .common import console, fail
from .servers import say, usable_port

api_app = typer.Typer(
    help="The HTTP API for an app's backend: photos, trainings, predictions, webhooks, forget.",
    no_args_is_help=False,
    invoke_without_command=True,
)

LOCAL_KEY_NAME = "local"


@api_app.callback()
def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8800, "--port", min=0, help="port to listen on (0: any free port)"),
    api_config: Path = typer.Option(
        None,
        "--api-config",
        help="the API's settings (JSON of ApiConfig: keys, rate limit, webhooks, presets); "
        "required with a deployment; the local stack makes a key when none is given",
    ),
    endpoint: str = typer.Option(
        None,
        "--endpoint",
        help="a deployment's SageMaker multi-model endpoint, e.g. avatarforge-mme (as "
        "`generate --endpoint`; with --config for its bucket); none: the local stack",
    ),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    region: str = typer.Option(None, "--region", help="AWS region (with --endpoint)"),
    out: Path = typer.Option(None, "--out", help="the local stack's folder (default build/api)"),
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json, the web page at /).

    Without --endpoint/--config it runs on the local stack of `make demo-cloud` (moto, the
    async training endpoint running the real training service, the MME with tritonserver) and
    prints a key for the session. Ctrl-C stops everything.
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..api import ApiConfig, hash_key, new_key

    settings = ApiConfig.read(api_config) if api_config else None
    port = usable_port(port, "the API", {"the API": "--port"}, host)
    if endpoint or config:
        if settings is None:
            fail("--api-config: required with a deployment (its API keys)", code=2)
        from .cloud import deploy_config

        deployment = deploy_config(config, region=region)
        _run(settings, deployment, host, port, endpoint=endpoint)
        return
    key = None
    if settings is None:
        key = new_key()
        entry = {"name": LOCAL_KEY_NAME, "sha256": hash_key(key), "namespace": LOCAL_KEY_NAME}
        settings = ApiConfig.from_dict({"keys": [entry]})
    if not os.environ.get(settings.webhook_secret_env):  # this session's, for local webhooks
        os.environ[settings.webhook_secret_env] = secrets.token_hex(32)
    _local(settings, host, port, key, out)


def _local(settings, host: str, port: int, key: str | None, out: Path | None) -> None:
    from ..demos.cloud import CPU_INVOKE_TIMEOUT_S, local_stack
    from ..paths import build_dir
    from .servers import instance_env, stop_on_sigterm

    stop_on_sigterm()  # moto and tritonserver are stopped on any exit
    root = (out or build_dir() / "api").resolve()
    say(f"starting the local stack in {root} (moto, training endpoint, MME: about 20 s)")
    env = instance_env("tiny", root / "mme" / "shared")
    try:
        with local_stack(env, root) as stack:
            say(f"local deployment: bucket {stack.config.bucket}, runtime {stack.runtime.url}")
            _run(
                settings,
                stack.config,
                host,
                port,
                key=key,
                invoke_timeout_s=CPU_INVOKE_TIMEOUT_S + 10,
                mme_sagemaker_url=stack.sagemaker_url,
            )
    except KeyboardInterrupt:
        pass


def _run(settings, deployment, host: str, port: int, *, key=None, endpoint=None, **extra) -> None:
    import uvicorn

    from ..api import ApiService, create_app

    service = ApiService(deployment, settings, endpoint=endpoint, **extra)
    app = create_app(service)
    url = f"http://{host}:{port}"
    say(f"avatarforge API on {url}  (page {url}/, OpenAPI {url}/openapi.json)")
    if key:
        say(f"API key of this session (namespace {LOCAL_KEY_NAME}): {key}")
    try:
        service.webhook_secret()
    except Exception as exc:  # the API serves; only webhooks are refused (503)
        console.print(f"[yellow]webhooks off:[/] {exc}", soft_wrap=True)
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)


@api_app.command("new-key")
def new_key_command(
    name: str = typer.Argument(..., help="the key's name (logs, rate limit)"),
    namespace: str = typer.Option(
        None,
        "--namespace",
        help="where its users live: 1-12 lower-case letters and digits (default: from the name)",
    ),
) -> None:
    """Make an API key: prints the key once (give it to the app) and the entry for the API's
    settings file, which keeps only its sha256."""
    from ..api import hash_key, new_key
    from ..api.config import ApiKey
    from ..settings import ConfigError

    key = new_key()
    namespace = namespace or re.sub(r"[^a-z0-9]", "", name.lower())[:12]
    entry = {"name": name, "sha256": hash_key(key), "namespace": namespace}
    try:
        ApiKey.from_dict(entry, "key")
    except ConfigError as exc:
        fail(f"{exc} (give --namespace)", code=2)
    console.print(f"key (shown once): {key}", soft_wrap=True, highlight=False)
    console.print("add to the settings file's keys:", highlight=False)
    print(json.dumps(entry))


@api_app.command("plan")
def plan_command(
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    bucket: str = typer.Option(None, "--bucket", help="the deployment's S3 bucket"),
    as_json: bool = typer.Option(False, "--json", help="the plan as JSON"),
) -> None:
    """The API's place in the deploy plan (a dry run, no AWS account needed): the IAM role it
    runs as, limited to what it calls, its image, environment and command. Optional: it runs
    behind your own load balancer or API gateway."""
    from ..deploy.run import make_plan
    from .cloud import deploy_config
    from .deploy import print_plan

    deployment = deploy_config(config, bucket, need_bucket=False)
    plan = make_plan("api", deployment, create_role=True)
    if as_json:
        print(json.dumps(plan.to_dict(), indent=2, default=str))
        return
    print_plan(plan, console, show_policies=True)


def register(app: typer.Typer) -> None:
    app.add_typer(api_app, name="api")
