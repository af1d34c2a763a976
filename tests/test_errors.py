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
    # a training job ended by SIGTERM/SIGHUP: a BaseException for the same reason
    "avatarforge.jobs.run._Ended",
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


# --- AWS settings missing or wrong: one line that says what to set, from every AWS command ----

NO_AWS = {  # an environment without any AWS settings (nor a profile or instance role to find)
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_EC2_METADATA_DISABLED": "true",
}
REGION = "set AWS_REGION"
CREDENTIALS = "AWS_PROFILE"  # ours, or deploy's own "configure them (... AWS_PROFILE ...)"
UNREACHABLE = "is set: is that server running?"
# Every command that talks to AWS with the caller's settings, and the hint it must print.
# Not here: `mme serve --source s3://` (S3 is read when a model is first requested; failures are
# HTTP answers of the running front), demo-service and demo-cloud (their own moto server and
# dummy credentials, whatever the caller has set).
AWS_COMMANDS = [
    (["generate", "--endpoint", "avatarforge-mme", "--user", "alice", "--prompt", "hi"], REGION),
    (["avatars", "alice", "--pack", "classic", "--endpoint", "avatarforge-mme"], REGION),
    (["generate", "--endpoint", "avatarforge-mme", "--user", "alice", "--prompt", "hi",
      "--region", "eu-west-1"], CREDENTIALS),
    (["avatars", "alice", "--pack", "classic", "--endpoint", "avatarforge-mme",
      "--region", "eu-west-1"], CREDENTIALS),
    (["submit", "--user", "alice", "--photos", "{photos}", "--bucket", "my-bucket"], CREDENTIALS),
    (["status", "alice-1", "--bucket", "my-bucket"], CREDENTIALS),
    (["deploy", "mme"], CREDENTIALS),
    (["deploy", "training"], CREDENTIALS),
    (["deploy", "destroy"], CREDENTIALS),
    (["deploy", "destroy", "--dry-run"], CREDENTIALS),
    (["preprocess", "s3://my-bucket/photos/", "{out}"], CREDENTIALS),
    (["job", "run", "s3://my-bucket/jobs/request.json"], CREDENTIALS),
    (["job", "validate", "s3://my-bucket/jobs/request.json"], CREDENTIALS),
]  # fmt: skip
# With credentials but an endpoint that does not answer (a closed loopback port).
UNREACHABLE_COMMANDS = [
    ["generate", "--endpoint", "avatarforge-mme", "--user", "alice", "--prompt", "hi",
     "--region", "eu-west-1"],
    ["deploy", "mme"],
    ["preprocess", "s3://my-bucket/photos/", "{out}"],
]  # fmt: skip
# A header printed before the endpoint is asked (what will be rendered): allowed above the error.
HEADER = {"avatars"}


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_without_aws(args: list[str], extra: dict[str, str], tmp_path: Path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(NO_AWS, **extra, HOME=str(tmp_path / "home"), COLUMNS="80")
    args = [a.format(photos=tmp_path / "photos", out=tmp_path / "out") for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "avatarforge", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    return args, done


def test_every_aws_command_without_aws_settings_prints_one_line_saying_what_to_set(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "me.jpg").write_bytes(b"\xff\xd8 not really")
    credentials = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "example"}
    unreachable = {**credentials, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}",
                   "AWS_MAX_ATTEMPTS": "1"}  # fmt: skip
    runs = [(args, {}, hint) for args, hint in AWS_COMMANDS]
    runs += [(args, unreachable, UNREACHABLE) for args in UNREACHABLE_COMMANDS]
    with ThreadPoolExecutor(max_workers=4) as pool:  # each is its own process: ~1 s of CPU
        results = list(pool.map(lambda run: _run_without_aws(run[0], run[1], tmp_path), runs))
    for (_, _, hint), (args, done) in zip(runs, results, strict=True):
        shown = done.stdout + done.stderr
        lines = [line for line in shown.splitlines() if line.strip()]
        where = f"avatarforge {' '.join(args)}:\n{shown}"
        assert done.returncode in (1, 2), where
        assert "Traceback" not in shown and "╭" not in shown, where  # no (rich) traceback
        assert lines and lines[-1].startswith("error: ") and hint in lines[-1], where
        if args[0] not in HEADER:
            assert len(lines) == 1, where  # botocore's INFO lines are not shown either
    region = results[0][1].stdout
    assert "give --region, or set AWS_REGION" in region  # the command has the option: named


def test_a_deploy_plan_needs_no_aws_settings(tmp_path):
    _, done = _run_without_aws(["deploy", "mme", "--dry-run"], {}, tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr  # blockers (no bucket): not 0 (#23)
    assert "dry run: planned against nothing" in done.stdout and "blocker:" in done.stdout


def test_aws_hint_names_what_to_do_for_refused_credentials_and_nothing_else():
    from botocore.exceptions import ClientError, NoRegionError

    from avatarforge.cli.common import aws_hint
    from avatarforge.storage import StorageError

    expired = ClientError({"Error": {"Code": "ExpiredToken", "Message": "expired"}}, "GetObject")
    assert "expired or wrong" in aws_hint(expired)
    try:  # ours, raised from botocore's: the cause is found
        try:
            raise NoRegionError()
        except NoRegionError as exc:
            raise StorageError("cannot list") from exc
    except StorageError as exc:
        assert "AWS_REGION" in aws_hint(exc)
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "GetObject")
    assert aws_hint(denied) is None  # the message says what is wrong; no setting cures it
    assert aws_hint(ValueError("x")) is None and aws_hint(None) is None
