"""`avatarforge eval USER`: does the adapter show the user, and only where asked?"""

from __future__ import annotations

import difflib
from pathlib import Path

import typer

from ..quality.config import EvalConfig
from .common import config_options, console, fail


def known_users(users_dir: Path) -> list[str]:
    """Users with an adapter under ``users_dir`` (build/users)."""
    if not users_dir.is_dir():
        return []
    return sorted(p.name for p in users_dir.iterdir() if (p / "adapter").is_dir())


def unknown_user(user: str, adapter: Path, users_dir: Path) -> str:
    """The error for a user without an adapter: what was looked for, who exists, what to do."""
    users = known_users(users_dir)
    close = difflib.get_close_matches(user, users, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    others = f"users with an adapter: {', '.join(users)}" if users else "no user has one yet"
    return (
        f"unknown user {user!r}: no adapter at {adapter} ({hint}{others}); train one with "
        f"`avatarforge train DATASET --user {user}` or give --adapter"
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@config_options(EvalConfig)
def eval_command(
    user: str = typer.Argument(..., help="the user whose adapter to evaluate"),
    dataset: Path = typer.Option(
        None,
        "--dataset",
        help="the user's preprocessed photos (the folder `avatarforge preprocess` wrote; "
        "default: build/datasets/USER)",
    ),
    adapter: Path = typer.Option(
        None, "--adapter", help="adapter folder (default: build/users/USER/adapter)"
    ),
    out: Path = typer.Option(
        None, "--out", help="report folder (default: build/eval/USER; replaced whole)"
    ),
    base: str = typer.Option(
        "",
        "--base",
        help="where the base is, if not where the adapter says (its hash is still checked)",
    ),
    **options,
) -> None:
    """Score a user's adapter: face found, identity (distance to the user's kept photos, dlib
    128-d embedding, 0.6) and leakage (class-prompt faces must not be the user), over a fixed
    seeded prompt set. Writes report.json and grid.png (the images with their scores)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..base.config import BaseConfig, resolve_base
    from ..errors import AvatarforgeError
    from ..names import check_user_id
    from ..paths import build_dir
    from ..quality import evaluate

    check_user_id(user, field="USER")
    users_dir = build_dir() / "users"
    if adapter is None:
        adapter = users_dir / user / "adapter"
        if not adapter.is_dir():
            fail(unknown_user(user, adapter, users_dir))
    if dataset is None:
        dataset = build_dir() / "datasets" / user
        if not dataset.is_dir():
            fail(
                f"no dataset for {user!r} at {dataset}: give --dataset, the folder "
                "`avatarforge preprocess` wrote for this user (its kept photos are the reference)"
            )
    try:
        config = EvalConfig(**options)
    except AvatarforgeError as exc:
        fail(str(exc))
    out = out or build_dir() / "eval" / user
    # an imported base is recorded by its id (e.g. a hub id), not by the folder it is in
    found = resolve_base(BaseConfig(base=base)) if base else None
    total = 2 * config.prompts * config.seeds
    try:
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console
        ) as progress:
            generating = progress.add_task("generate", total=total)
            scoring = progress.add_task("score", total=total)
            result = evaluate(
                user,
                adapter,
                dataset,
                out,
                config,
                base=found,
                on_image=lambda done, _: progress.update(generating, completed=done),
                on_score=lambda done, _, __: progress.update(scoring, completed=done),
            )
    except AvatarforgeError as exc:
        fail(str(exc))
    report = result.report
    s = report.scores
    ident, leak = s["identity"], s["leakage"]
    refs = sum(r["face"] for r in report.references)
    console.print(
        f"{user}: {s['images']} images, {refs}/{len(report.references)} kept photos with a face "
        f"(threshold {report.threshold})\n"
        f"  face found  {_pct(s['face_found_rate'])}\n"
        f"  identity    {_pct(ident['match_rate'])} of {ident['images']} token images are the "
        f"user (mean distance {_num(ident['mean_distance'])})\n"
        f"  leakage     {_pct(leak['leak_rate'])} of {leak['faces']} class-prompt faces are the "
        f"user (closest {_num(leak['min_distance'])}; lower is better)",
        highlight=False,
    )
    for note in report.notes:
        console.print(f"  [dim]{note}[/]")
    if report.measures_nothing:
        console.print(f"[bold yellow]{report.why}[/]", soft_wrap=True)
    console.print(f"report [bold]{result.report_path}[/]\ngrid   [bold]{result.grid_path}[/]")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
