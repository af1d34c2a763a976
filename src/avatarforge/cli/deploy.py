"""`avatarforge deploy mme|training|destroy`: put avatarforge on SageMaker, or take it down."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from ..deploy import DeployConfig, Plan, execute, make_clients, make_plan
from ..deploy.security import KEY_DELETION_WINDOW_DAYS
from .common import config_options, console, fail

deploy_app = typer.Typer(
    help="Deploy to AWS SageMaker: the multi-model endpoint (Triton) that serves every user, the "
    "async training endpoint that scales to zero, and their S3 layout. Every command prints "
    "its plan first; --dry-run prints only the plan and needs no AWS account.",
    no_args_is_help=True,
)

CONFIG_HELP = "deployment description (JSON with DeployConfig fields; options override it)"
DRY_RUN_HELP = "print the plan and change nothing (no AWS account or network needed)"
JSON_HELP = "print the plan as JSON on stdout (progress goes to stderr)"
CREATE_ROLE_HELP = (
    "create the endpoint's least-privilege IAM role (tagged; destroy removes it) when no role "
    "ARN is configured"
)
_ACTION_STYLE = {
    "create": "green",
    "update": "yellow",
    "delete": "red",
    "conflict": "bold red",
    "unchanged": "dim",
}


def load_config(
    ctx: typer.Context, config_file: Path | None, options: dict[str, Any]
) -> DeployConfig:
    """The --config file's fields, overridden by the options given on the command line."""
    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = json.loads(Path(config_file).read_text())
        except (OSError, ValueError) as exc:
            fail(f"--config {config_file}: {exc}")
        if not isinstance(data, dict):
            fail(f"--config {config_file}: must hold a JSON object of deploy settings")
    for name, value in options.items():
        source = ctx.get_parameter_source(name)
        # by name: typer's ParameterSource is not click's enum (other values)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT"):
            data[name] = value
    try:
        return DeployConfig.from_dict(data)
    except TypeError as exc:
        fail(str(exc))


def _detail(r) -> str:
    a = r.attrs
    match r.kind:
        case "s3_object":
            size = a.get("size")
            return f"sha256 {a['sha256'][:12]}…, {size / 2**20:.1f} MiB" if size else "not built"
        case "sagemaker_model" if "PrimaryContainer" in a:
            c = a["PrimaryContainer"]
            return f"{c['Mode']} {c['Image'].rsplit('/', 1)[-1]}"
        case "endpoint_config" if "ProductionVariants" in a:
            v = a["ProductionVariants"][0]
            kind = "async" if "AsyncInferenceConfig" in a else "real time"
            return f"{v['InstanceType']} x{v['InitialInstanceCount']}, {kind}"
        case "endpoint":
            return f"config {a.get('EndpointConfigName', '')}" if a else ""
        case "scalable_target" if "MinCapacity" in a:
            return f"{a['MinCapacity']}..{a['MaxCapacity']} instances"
        case "scaling_policy" if "PolicyType" in a:
            body = a.get("TargetTrackingScalingPolicyConfiguration")
            if body:
                metric = body.get("PredefinedMetricSpecification", {}).get(
                    "PredefinedMetricType"
                ) or body.get("CustomizedMetricSpecification", {}).get("MetricName")
                return f"target {metric} = {body['TargetValue']:g}"
            return "step +1 instance when the alarm fires"
        case "cloudwatch_alarm" if "MetricName" in a:
            stat = a.get("ExtendedStatistic") or a.get("Statistic")
            span = a["Period"] * a["EvaluationPeriods"]
            limit = f"{a['Threshold']:g}"
            if a["MetricName"].endswith(("Latency", "WaitTime")):  # microseconds
                limit = f"{a['Threshold'] / 1e6:g} s"
            return f"{stat} {a['MetricName']} >= {limit} over {span} s"
        case "s3_prefix":
            return f"{a['objects']} objects"
        case "s3_lifecycle" if "Rules" in a:
            if not a["Rules"]:
                return "no expiry" if r.action != "delete" else "this deployment's rules only"
            days = a["Rules"][0]["Expiration"]["Days"]
            folders = ", ".join(x["Filter"]["Prefix"] for x in a["Rules"])
            return f"{folders} expire {days} days after they are written"
        case "log_group" if "logGroupName" in a:
            days = a["retentionInDays"]
            return f"events expire after {days} days" if days else "events never expire"
        case "kms_key" if "AliasName" in a:
            return "S3 objects, endpoint volumes, SNS topics"
        case "kms_key":
            return f"deletion scheduled in {KEY_DELETION_WINDOW_DAYS} days, alias removed"
        case "s3_bucket_encryption" if "Rules" in a:
            return "default encryption SSE-KMS with the deployment's key, S3 bucket key"
        case "sns_topic" if a.get("KmsMasterKeyId"):
            return "encrypted with the deployment's key"
        case "sns_subscription" if "Protocol" in a:
            pending = " (email and https: pending until confirmed)" if r.action == "create" else ""
            return f"{a['Protocol']} {a['Endpoint']}{pending}"
    return ""


def print_plan(plan: Plan, out: Console, *, show_policies: bool) -> None:
    """The plan as a table plus the facts a reader needs (image, Python, cost, blockers)."""
    where = f"account {plan.account}" if plan.account else "dry run: planned against nothing"
    out.print(f"[bold]deploy {plan.command}[/]: {plan.deployment} in {plan.region} ({where})")
    # one line per resource (not a table): names stay whole and greppable at any width
    for r in plan.resources:
        style = _ACTION_STYLE.get(r.action, "")
        detail = _detail(r)
        if r.changes and r.action != "unchanged":
            detail = "; ".join([detail, *r.changes]) if detail else "; ".join(r.changes)
        out.print(
            f"  [{style}]{r.action:<9}[/] {r.kind:<16} {r.name}  [dim]{detail}[/]",
            soft_wrap=True,
            highlight=False,
        )
    facts = plan.facts
    if image := facts.get("image"):
        line = f"image: {image['uri']}"
        if "stub_python" in image:
            line += f"  (Triton {image['triton_tag']}: its python stub needs Python "
            line += f"{image['stub_python']}; the serving env is built for it)"
        if "built_from" in image:
            line += f"  (FROM {image['built_from']})"
        out.print(line, soft_wrap=True)
    if ami := facts.get("inference_ami"):
        out.print(f"instances: InferenceAmiVersion {ami}", soft_wrap=True)
    if triton := facts.get("triton"):
        out.print(
            f"tritonserver: /ping mode {triton['ping_mode']} (user models repair a dead shared "
            f"base; 'ready' would fail the instance), --log-verbose={triton['log_verbose']}",
            soft_wrap=True,
        )
    if scaling := facts.get("scaling"):
        _print_scaling(scaling, out)
    if cost := facts.get("cost"):
        _print_cost(cost, out)
    if "invocation_timeout_s" in facts:
        out.print(
            f"training jobs: timeout {facts['invocation_timeout_s']} s per invocation, expire "
            f"after {facts['request_ttl_s']} s in the queue (both sent by the client), service "
            f"deadline {facts['service_deadline_s']} s",
            soft_wrap=True,
        )
    if security := facts.get("security"):
        _print_security(security, out)
    if retention := facts.get("retention"):
        _print_retention(retention, facts.get("alarms", {}), out)
    for note in plan.notes:
        out.print(f"note: {note}", soft_wrap=True)
    if show_policies:
        for component, docs in facts.get("policies", {}).items():
            out.print(f"IAM for the {component} endpoint's execution role:")
            out.print(f"  trust policy: {json.dumps(docs['trust'])}", soft_wrap=True)
            out.print("  permissions policy:")
            out.print(json.dumps(docs["permissions"], indent=2), soft_wrap=True, highlight=False)
    for blocker in plan.blockers:
        out.print(f"[bold red]blocker:[/] {blocker}", soft_wrap=True)
    changes = len(plan.changes)
    out.print(f"{changes} change(s), {len(plan.resources) - changes} unchanged")


def _print_scaling(scaling: dict, out: Console) -> None:
    throughput = scaling["throughput"]
    if scaling["target"] is None:
        out.print("scaling: no target (see the blocker)")
        return
    line = (
        f"scaling: target {scaling['target']} invocations/min per instance, from {scaling['from']}"
    )
    if throughput:
        label = " (ESTIMATE)" if throughput["estimate"] else ""
        line += (
            f"; throughput {throughput['images_per_minute']} images/min per instance"
            f"{label}: {throughput['basis']}, at {throughput['workload']}; "
            f"source {throughput['source']}"
        )
    out.print(line, soft_wrap=True, highlight=False)


def _print_cost(cost: dict, out: Console) -> None:
    price = cost["usd_per_instance_hour"]
    if price is None:
        out.print(f"cost: no price on record for {cost['instance_type']}")
        return
    out.print(
        f"cost: {cost['instance_type']} ≈ ${price:.3f}/h per instance: "
        f"${cost['usd_per_hour_at_min']:g}/h at {cost['min_instances']}, "
        f"${cost['usd_per_hour_at_max']:g}/h at {cost['max_instances']} instances "
        f"({cost['as_of']})",
        soft_wrap=True,
    )
    if images := cost.get("per_images"):
        line = f"cost per 1,000 images ≈ ${images['usd_per_1000_images']:.2f} on busy instances"
        if "usd_per_1000_images_at_target" in images:
            line += f", ${images['usd_per_1000_images_at_target']:.2f} at the scaling target"
        out.print(line + " (the throughput above)", soft_wrap=True)
    if job := cost.get("per_job"):
        label = " (ESTIMATE)" if job["estimate"] else ""
        usd = "" if job["usd_per_job"] is None else f" ≈ ${job['usd_per_job']:.2f}"
        out.print(
            f"cost per training job{usd}: {job['minutes_per_job']} min on an {job['gpu']}"
            f"{label}, alone on an instance ({job['basis']}; source {job['source']}); a job "
            "after idle also pays the instance's start and its scale-in wait",
            soft_wrap=True,
            highlight=False,
        )


def _print_security(security: dict, out: Console) -> None:
    out.print(f"encryption: KMS key {security['kms_key']}; volumes: {security['volumes']}",
              soft_wrap=True)  # fmt: skip
    vpc = security["vpc"]
    where = (
        f"VPC subnets {', '.join(vpc['subnets'])}, security groups "
        f"{', '.join(vpc['security_groups'])}"
        if vpc
        else "no VPC (SageMaker's network, with internet access)"
    )
    out.print(
        f"network: {where}; EnableNetworkIsolation {security['network_isolation_why']}; "
        f"{security['internet']}",
        soft_wrap=True,
    )


def _print_retention(retention: dict, alarms: dict, out: Console) -> None:
    if retention["days"]:
        expire = ", ".join(retention["expire"])
        line = f"retention: {expire} expire after {retention['days']} days (S3 lifecycle)"
    else:
        line = "retention: none (retention_days 0): photos and job files stay until forget"
    line += f"; {', '.join(retention['kept'])} stay until forget"
    days = retention["log_retention_days"]
    line += f"; endpoint logs expire after {days} days" if days else "; endpoint logs never expire"
    out.print(line, soft_wrap=True)
    if alarms:
        subscribers = ", ".join(alarms["subscriptions"]) or "nobody (alarm_subscriptions)"
        out.print(
            f"alarms: {len(alarms['names'])} notify SNS {alarms['topic']}, subscribed: "
            f"{subscribers}",
            soft_wrap=True,
        )


def _run(
    command: str,
    ctx: typer.Context,
    config_file: Path | None,
    dry_run: bool,
    as_json: bool,
    options: dict[str, Any],
    *,
    create_role: bool = False,
    delete_data: bool = False,
) -> None:
    config = load_config(ctx, config_file, options)
    out = Console(stderr=True) if as_json else console
    _quiet_libraries()
    if dry_run and command != "destroy":
        plan = make_plan(command, config, create_role=create_role)
    else:
        clients = make_clients(config)
        plan = make_plan(command, config, clients, create_role=create_role, delete_data=delete_data)
    if as_json:
        print(json.dumps(plan.to_dict(), indent=2, default=str))
    else:
        show = dry_run or any("IAM role" in b for b in plan.blockers)
        print_plan(plan, out, show_policies=show)
    if dry_run:
        if plan.blockers:  # CI can gate on a dry run; with --json, stdout stays the plan alone
            count = len(plan.blockers)
            out.print(f"[bold red]error:[/] deploy {command} --dry-run: {count} blocker(s) stand")
            raise typer.Exit(1)
        return
    if plan.blockers:
        fail(f"deploy {command} stopped before changing anything: {plan.blockers[0]}")
    if not plan.changes:
        out.print("nothing to do: what exists matches the plan")
        return
    execute(plan, clients, config, progress=lambda line: out.print(line, soft_wrap=True))
    _print_next_steps(command, config, plan, out)


def _quiet_libraries() -> None:
    if logging.getLogger().level > logging.DEBUG:  # their INFO lines hide the plan (-v: shown)
        for name in ("botocore", "boto3", "s3transfer", "sagemaker"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _print_next_steps(command: str, config: DeployConfig, plan: Plan, out: Console) -> None:
    if command == "mme":
        out.print(
            f"[bold]MME endpoint {config.mme_endpoint_name} is in service.[/] Put user models at "
            f"{config.models_prefix}<user>.tar.gz, then: avatarforge generate --endpoint "
            f"{config.mme_endpoint_name} --user <user> --prompt ...",
            soft_wrap=True,
        )
    elif command == "training":
        out.print(
            f"[bold]training endpoint {config.training_endpoint_name} is in service[/] (it "
            "scales to zero when idle). Submit a job: avatarforge submit --user <user> "
            "--photos <dir>",
            soft_wrap=True,
        )
    elif command == "api":
        out.print(
            "[bold]the API's role is in place.[/] Run api_container/'s image (or avatarforge "
            "api) as that role, behind your load balancer or API gateway",
            soft_wrap=True,
        )
    else:
        out.print(f"removed {len(plan.changes)} resource(s) of deployment {config.name}")


@deploy_app.command("mme")
@config_options(DeployConfig)
def mme(
    ctx: typer.Context,
    config_file: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    create_role: bool = typer.Option(False, "--create-role", help=CREATE_ROLE_HELP),
    **options: Any,
) -> None:
    """The multi-model endpoint: S3 layout, base + serving env uploads, Triton model,
    endpoint (default ml.g5.2xlarge) and its autoscaling (min 1). Re-running applies only
    what changed: a new endpoint config and an in-place endpoint update, or nothing."""
    _run("mme", ctx, config_file, dry_run, as_json, options, create_role=create_role)


@deploy_app.command("training")
@config_options(DeployConfig)
def training(
    ctx: typer.Context,
    config_file: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    create_role: bool = typer.Option(False, "--create-role", help=CREATE_ROLE_HELP),
    **options: Any,
) -> None:
    """The async training endpoint (our LMI image): SNS success/error topics, async output and
    failure paths, jobs per instance, and scale to zero (min 0, backlog target tracking, an
    alarm + step policy that wakes it for the first job after idle)."""
    _run("training", ctx, config_file, dry_run, as_json, options, create_role=create_role)


@deploy_app.command("api")
@config_options(DeployConfig)
def api(
    ctx: typer.Context,
    config_file: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    create_role: bool = typer.Option(False, "--create-role", help=CREATE_ROLE_HELP),
    **options: Any,
) -> None:
    """Optional: the HTTP API's IAM role (`avatarforge api`, api_container/), limited to the
    S3 prefixes and endpoints it calls; the API itself runs behind your own load balancer or
    API gateway."""
    _run("api", ctx, config_file, dry_run, as_json, options, create_role=create_role)


@deploy_app.command("images")
@config_options(
    DeployConfig, only=("region", "triton_image_tag", "mme_instance_type", "lmi_image_tag")
)
def images(
    ctx: typer.Context,
    config_file: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    **options: Any,
) -> None:
    """The deployment's image URIs, from the sagemaker SDK's table: "triton <uri>" (the MME)
    and "lmi <uri>" (what `make training-image` builds FROM). No AWS account needed."""
    from ..deploy import lmi_image_uri, triton_image_uri

    config = load_config(ctx, config_file, options)
    _quiet_libraries()
    triton = triton_image_uri(config.region, config.triton_image_tag, config.mme_instance_type)
    lmi = lmi_image_uri(config.region, config.lmi_image_tag)
    print(f"triton {triton}\nlmi {lmi}")


@deploy_app.command("destroy")
@config_options(DeployConfig, only=("name", "region", "bucket", "prefix"))
def destroy(
    ctx: typer.Context,
    config_file: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="list what would be removed (needs AWS credentials to list)"
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    delete_data: bool = typer.Option(
        False,
        "--delete-data",
        help="also delete every S3 object under the deployment's prefix (photos, user models, "
        "jobs, outputs) and the bucket if deploy created it and nothing else is in it",
    ),
    **options: Any,
) -> None:
    """Remove exactly what deploy made — everything tagged avatarforge:deployment=<name> — and
    nothing else. S3 data stays unless --delete-data."""
    _run("destroy", ctx, config_file, dry_run, as_json, options, delete_data=delete_data)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.add_typer(deploy_app, name="deploy")
