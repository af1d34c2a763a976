"""`avatarforge forget USER`: delete a user's data and unload them; print what was removed."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from .common import console, fail

INCOMPLETE = 1  # something could not be removed yet: the table says what


def forget_command(
    user: str = typer.Argument(..., help="the user id to forget"),
    config: Path = typer.Option(
        None,
        "--config",
        help="deployment description (deploy.json, as for `avatarforge deploy`): also delete "
        "the user's photos, model, job records and async outputs in its bucket",
    ),
    local: bool = typer.Option(
        True,
        "--local/--no-local",
        help="the build folder and the local-triton servers it started (--no-local: only "
        "--config and --mme-sagemaker-url)",
    ),
    mme_sagemaker_url: str = typer.Option(
        None,
        "--mme-sagemaker-url",
        help="a running `mme serve`: its 'SageMaker front' URL (tritonserver's, not the MME "
        "front): <USER>.tar.gz is unloaded there",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="find and list; change nothing"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON (stdout)"),
) -> None:
    """Forget a user: delete their photos, dataset, adapter and checkpoints, package and its
    digest, exports, generated images, avatars, eval report and job records; unload them from
    running local servers. Finds by exact name (`al` never matches `alice`); running it again
    removes nothing more. Exit code 1 when something could not be removed (yet)."""
    from ..forget import forget
    from ..names import check_user_id

    check_user_id(user, field="USER")  # before anything is read, let alone deleted
    deployment = None
    if config is not None:
        from .cloud import deploy_config

        deployment = deploy_config(config)
    report = forget(
        user,
        local=local,
        deployment=deployment,
        mme_sagemaker_url=mme_sagemaker_url,
        dry_run=dry_run,
    )
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print(report)
    if not report.complete:
        raise typer.Exit(INCOMPLETE)


def _print(report) -> None:
    found = len(report.removals)
    if not found:
        console.print(f"nothing of {report.user} found: nothing to remove", highlight=False)
    else:
        verb = "would remove" if report.dry_run else "removed"
        table = Table(title=f"forget {report.user}: {verb} {found}")
        for column in ("where", "what", "target", "action", "detail"):
            table.add_column(column, overflow="fold")
        for r in report.removals:
            action = f"[red]{r.action}[/]" if r.failed else r.action
            table.add_row(r.where, r.what, escape(r.target), action, escape(r.detail))
        console.print(table)
    for line in report.pending:
        console.print(f"[yellow]not done:[/] {escape(line)}", soft_wrap=True)
    for line in report.notes:
        console.print(f"[dim]note:[/] {escape(line)}", soft_wrap=True)
    if not report.complete:
        fail("not everything could be removed (see above); run forget again", code=INCOMPLETE)


def register(app: typer.Typer) -> None:
    app.command("forget")(forget_command)
