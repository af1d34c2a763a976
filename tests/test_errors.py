"""One root error type: every error class of the package derives from AvatarforgeError, says
whose fault it is, and the CLI turns any of them into one clear line, never a traceback."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import avatarforge
from avatarforge.cli import app
from avatarforge.errors import AvatarforgeError

PACKAGE = Path(avatarforge.__file__).parent
# Error classes that must not derive from the root, and why.
EXEMPT = {
    # copied into every user model and run under the stock image's bare Python (no avatarforge)
    "avatarforge.serving.bootstrap.BootstrapError",
    # the train command's signal stop: a BaseException so that no `except Exception` eats it
    "avatarforge.cli.train._Stop",
}
# Modules that only import inside a Triton python backend (pb_utils, the bootstrap's copy).
BACKEND_ONLY = "avatarforge.serving.triton_models."


def _modules():
    for info in pkgutil.walk_packages([str(PACKAGE)], "avatarforge."):
        if info.name == "avatarforge.__main__":  # runs the CLI when imported
            continue
        yield info.name


def _error_classes() -> dict[str, type[BaseException]]:
    found = {}
    for name in _modules():
        if name.startswith(BACKEND_ONLY):
            # cannot be imported here: a model class and no error classes of their own
            path = PACKAGE.joinpath(*name.split(".")[1:]).with_suffix(".py")
            tree = ast.parse(path.read_text())
            assert all(
                not node.bases for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            ), f"{name} defines a class with a base: check it is no error class"
            continue
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_error_class_derives_from_the_root():
    classes = _error_classes()
    assert len(classes) > 40, sorted(classes)  # the walk found the package's errors
    outside = sorted(
        name
        for name, cls in classes.items()
        if not issubclass(cls, AvatarforgeError) and name not in EXEMPT
    )
    assert outside == [], f"derive these from avatarforge.errors.AvatarforgeError: {outside}"
    assert set(classes) >= EXEMPT, "an exempt class is gone: drop it from EXEMPT"


def test_each_error_says_an_http_status_and_whose_fault():
    for name, cls in _error_classes().items():
        if name in EXEMPT:
            continue
        assert isinstance(cls.status, int) and 400 <= cls.status <= 599, name
    from avatarforge.names import InvalidNameError
    from avatarforge.storage import ObjectNotFoundError, StorageError

    assert InvalidNameError("x").client_fault and InvalidNameError.status == 400
    assert ObjectNotFoundError("x").status == 404 and ObjectNotFoundError("x").client_fault
    assert not StorageError("x").client_fault and StorageError.status == 500
    # builtin bases are kept where callers catch them
    assert issubclass(InvalidNameError, ValueError) and issubclass(ObjectNotFoundError, OSError)


def test_cli_prints_a_caller_error_without_traceback():
    # the export command does not catch InvalidNameError itself: the root command group does
    result = CliRunner().invoke(app, ["export", "not a/name"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: USER: "), result.output
    assert "Traceback" not in result.output
    # as a real process: one line on the console, nothing on stderr
    done = subprocess.run(
        [sys.executable, "-m", "avatarforge", "export", "not a/name"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stdout.startswith("error: USER: ") and done.stdout.count("\n") == 1, done.stdout
    assert "Traceback" not in done.stdout + done.stderr
