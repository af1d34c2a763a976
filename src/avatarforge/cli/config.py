"""`avatarforge config`: every setting of every step, with its default and meaning."""

from __future__ import annotations

import importlib

import typer
from rich.table import Table

from .common import console, fail

# (module, class) of each step's config, in the order of the data's path
CONFIGS = (
    ("avatarforge.base.config", "BaseConfig"),
    ("avatarforge.preprocess", "PreprocessConfig"),
    ("avatarforge.train", "TrainConfig"),
    ("avatarforge.generate", "GenArgs"),
    ("avatarforge.quality.config", "EvalConfig"),
    ("avatarforge.serving.config", "ServingConfig"),
    ("avatarforge.mme.loader", "MMEConfig"),
    ("avatarforge.jobs", "ServiceConfig"),
    ("avatarforge.deploy.config", "DeployConfig"),
)


def settings_rows(section: str | None = None) -> list[tuple[str, object, str]]:
    """(name, default, help) of every setting, or of one section."""
    rows = []
    for module, name in CONFIGS:
        cls = getattr(importlib.import_module(module), name)
        if section in (None, cls.section):
            rows.extend(cls.describe())
    return rows


def markdown_table(rows: list[tuple[str, object, str]]) -> str:
    lines = ["| setting | default | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | `{default!r}` | {help} |" for name, default, help in rows]
    return "\n".join(lines)


def config(
    section: str = typer.Argument(None, help="one section: base, preprocess, train, ..."),
    markdown: bool = typer.Option(False, help="print a Markdown table (as in README.md)"),
) -> None:
    """List every setting with its default and meaning (the one place they are documented)."""
    rows = settings_rows(section)
    if not rows:
        sections = ", ".join(getattr(importlib.import_module(m), c).section for m, c in CONFIGS)
        fail(f"no config section {section!r}; sections: {sections}")
    if markdown:
        print(markdown_table(rows))
        return
    table = Table("setting", "default", "meaning")
    for name, default, help in rows:
        table.add_row(name, repr(default), help)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("config")(config)
