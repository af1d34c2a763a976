"""The `avatarforge` CLI: help on every command, clear errors, base build and doctor."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from avatarforge.cli import app

runner = CliRunner()


def _all_commands(group, prefix=()):
    # typer 0.29 vendors its own click: a group is whatever has subcommands
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from _all_commands(cmd, (*prefix, name))


COMMANDS = sorted(_all_commands(get_command(app)))
assert ("serve", "local-triton") in COMMANDS and ("deploy", "mme") in COMMANDS  # subcommands too


def test_root_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("base", "doctor"):
        assert name in result.output


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert len(result.output.splitlines()) > 3


def test_base_build_and_info(tmp_path, tiny_base):
    result = runner.invoke(app, ["base", "build", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert tiny_base.content_hash in result.output.replace("\n", "")
    result = runner.invoke(app, ["base", "info", str(tmp_path / "b")])
    assert result.exit_code == 0 and tiny_base.content_hash in result.output


def test_unknown_base_is_a_clear_error_not_a_traceback():
    result = runner.invoke(app, ["base", "info", "someone/not-local"])
    assert result.exit_code == 1
    assert "allow_download" in result.output
    assert "Traceback" not in result.output


def test_doctor_reports_tritonserver_and_gpu():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "tritonserver" in result.output and "GPU" in result.output


@pytest.mark.parametrize(
    "targets",
    [[], ["--url", "127.0.0.1:1", "--mme", "http://127.0.0.1:1"], ["--target-model", "a.tar.gz"]],
    ids=["neither", "both", "half"],
)
def test_generate_needs_exactly_one_target(targets):
    result = runner.invoke(app, ["generate", "--prompt", "x", *targets])
    assert result.exit_code == 2, result.output
    assert "--url and --user" in result.output and "--mme and --target-model" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def _command(path):
    group = get_command(app)
    for name in path:
        group = group.commands[name]
    return group


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_every_option_name_whole(command):
    # 80 columns, as in a pipe or a small terminal: names are never cut ("--gradient-accum…")
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    words = set(result.output.replace(",", " ").replace("/", " ").split())
    for param in _command(command).params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("-"):
                assert name in words, (name, result.output)


def test_version():
    from avatarforge import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"avatarforge {__version__}\n"
    assert __version__ == importlib.metadata.version("avatarforge")


def test_config_is_one_line_per_setting_and_json():
    from avatarforge.cli.config import settings_rows

    rows = settings_rows()
    result = runner.invoke(app, ["config"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line]  # blank between sections
    assert len(lines) == len(rows)  # a pipe gets no table borders or wrapped cells
    for line, (name, default, help) in zip(lines, rows, strict=True):
        assert line.startswith(f"{name} = {default!r} ") and line.endswith(f"  # {help}"), line
    result = runner.invoke(app, ["config", "train", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["train.steps"]["default"] == dict((n, d) for n, d, _ in rows)["train.steps"]
    assert all(name.startswith("train.") for name in data) and "meaning" in data["train.steps"]


def test_doctor_prints_paths_whole():
    from avatarforge.tritonserver.install import find_tritonserver

    binary = str(find_tritonserver().binary)
    assert len(binary) > 60  # longer than the cell the old 80-column table gave it
    result = runner.invoke(app, ["doctor"], env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    assert any(line.split() == ["tritonserver", binary] for line in result.output.splitlines())


def test_the_cpu_notice_names_resume_checkpoints_apart_from_gradient_checkpointing():
    from avatarforge.cli.train import cpu_notice
    from avatarforge.train.config import TrainConfig
    from avatarforge.train.estimate import Estimate

    est = Estimate("cpu", 512, 0, 25, 0.5, 1.0, 10.0, 89, 0.5, 800, 18.0, 30.0)
    text = " ".join(cpu_notice(est, TrainConfig(checkpoint_every=30)).split())
    # "checkpointing" alone is also the trainer's log word for gradient checkpointing
    assert "Resume checkpoints (the LoRA weights so far) are saved every 30 steps" in text
    assert "Checkpoints every" not in text
