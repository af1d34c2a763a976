"""`avatarforge config`: every setting of every step, with its default and meaning."""

from __future__ import annotations

import importlib
import json

import typer

from .common import fail

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
    ("avatarforge.api.config", "ApiConfig"),
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


def plain_lines(rows: list[tuple[str, object, str]]) -> list[str]:
    """One line per setting, ``name = default  # meaning`` (aligned within a section), a blank
    line between sections: whole in a pipe, never cut (``| grep steps`` finds a setting with
    its default and meaning)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    for name, default, help in rows:
        sections.setdefault(name.split(".")[0], []).append((f"{name} = {default!r}", help))
    lines: list[str] = []
    for settings in sections.values():
        width = max(len(left) for left, _ in settings)
        lines += ([""] if lines else []) + [f"{left:<{width}}  # {h}" for left, h in settings]
    return lines


def json_settings(rows: list[tuple[str, object, str]]) -> str:
    """``{"section.name": {"default": ..., "meaning": ...}}`` in the data's path order."""
    data = {name: {"default": default, "meaning": help} for name, default, help in rows}
    return json.dumps(data, indent=2, default=str)


def config(
    section: str = typer.Argument(None, help="one section: base, preprocess, train, ..."),
    markdown: bool = typer.Option(
        False, help="print a Markdown table (as in docs/configuration.md)"
    ),
    as_json: bool = typer.Option(
        False, "--json", help='print JSON: {"section.name": {"default": ..., "meaning": ...}}'
    ),
) -> None:
    """List every setting with its default and meaning (the one place they are documented):
    one line each, ``name = default  # meaning``."""
    rows = settings_rows(section)
    if not rows:
        sections = ", ".join(getattr(importlib.import_module(m), c).section for m, c in CONFIGS)
        fail(f"no config section {section!r}; sections: {sections}")
    if markdown and as_json:
        fail("give --markdown or --json, not both", code=2)
    if markdown:
        print(markdown_table(rows))
    elif as_json:
        print(json_settings(rows))
    else:
        print("\n".join(plain_lines(rows)))


def register(app: typer.Typer) -> None:
    app.command("config")(config)
