"""What every command shares: the console, clear errors, writing images, options from a config."""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
import re
import sys
import typing
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from pathlib import Path

import rich.markup
import typer
from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from typer.core import TyperGroup

from ..errors import AvatarforgeError

console = Console()
_invocation: ContextVar[typer.Context | None] = ContextVar("invocation", default=None)


def fail(message: str, code: int = 1) -> typing.NoReturn:
    """Print a clear error and exit non-zero (no traceback for expected errors).

    Called while an AWS error is being handled (a botocore error, or one of ours raised from
    it), the line also says what to set (:func:`aws_hint`): "Unable to locate credentials"
    alone does not."""
    hint = aws_hint(sys.exception())
    if hint and hint not in message:
        message = f"{message.rstrip('.')}; {hint}"
    # the message is text, not markup: "[a-z]" or "[[styles]]" must show as written
    console.print(f"[bold red]error:[/] {rich.markup.escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def _causes(exc: BaseException | None):
    """``exc`` and what it was raised from or while handling (``raise ... from None`` hides
    the second: its message was written to replace it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _command_takes(option: str) -> bool:
    """Does the command running now have ``option`` (e.g. --region)? (Of a command group's
    subcommand, nothing is known here: no.)"""
    ctx = _invocation.get()
    name = ctx.invoked_subcommand if ctx is not None else None
    command = ctx.command.get_command(ctx, name) if name else None
    return any(option in getattr(p, "opts", ()) for p in getattr(command, "params", ()))


# ClientError codes of credentials AWS does not accept (expired, unknown, mistyped secret).
_REFUSED_CREDENTIALS = {
    "ExpiredToken", "ExpiredTokenException", "RequestExpired", "InvalidClientTokenId",
    "UnrecognizedClientException", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "InvalidSignatureException", "AuthFailure",
}  # fmt: skip
_CREDENTIALS = (
    "AWS_PROFILE (a profile made by `aws configure` or `aws sso login`), or "
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
)


def aws_hint(exc: BaseException | None) -> str | None:
    """What to set when ``exc`` (or what it was raised from) is AWS settings missing or wrong:
    no region, no or refused credentials, an unknown profile, an endpoint not reachable. The
    error's own text says what is wrong; this says what to do. None for anything else."""
    bce = sys.modules.get("botocore.exceptions")
    if exc is None or bce is None:  # botocore never loaded: no AWS error can be in hand
        return None
    for err in _causes(exc):
        if isinstance(err, bce.NoRegionError):
            option = "give --region, or " if _command_takes("--region") else ""
            return (
                f"{option}set AWS_REGION (or AWS_DEFAULT_REGION, or region in the profile's "
                "~/.aws/config section)"
            )
        if isinstance(err, bce.NoCredentialsError | bce.PartialCredentialsError):
            return f"set {_CREDENTIALS}"
        if isinstance(err, bce.ProfileNotFound):
            return (
                "AWS_PROFILE names a profile that is not in ~/.aws/config: make it "
                "(`aws configure --profile NAME`) or unset AWS_PROFILE"
            )
        if isinstance(err, bce.SSOError | bce.TokenRetrievalError):
            return "log in again: `aws sso login` (with AWS_PROFILE set to the SSO profile)"
        if isinstance(err, bce.CredentialRetrievalError):
            return f"check the profile's credential_process or role, or set {_CREDENTIALS}"
        if isinstance(err, bce.ConnectionError | bce.HTTPClientError):
            endpoints = [
                f"{k}={v}" for k, v in sorted(os.environ.items())
                if k.startswith("AWS_ENDPOINT_URL") and v
            ]  # fmt: skip
            if endpoints:
                return f"{', '.join(endpoints)} is set: is that server running?"
            return "check the network (and HTTPS_PROXY where a proxy is needed)"
        if isinstance(err, bce.ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in _REFUSED_CREDENTIALS:
                return (
                    "the AWS credentials are expired or wrong: refresh them (`aws sso login`, "
                    f"new session keys) or set {_CREDENTIALS}"
                )
    return None


class Commands(TyperGroup):
    """The root command group: the one place an :class:`~avatarforge.errors.AvatarforgeError`
    that a command did not handle itself becomes ``error: <message>`` and exit code 1 (no
    traceback), as does an AWS error that is missing or wrong settings (:func:`aws_hint`: what
    to set). Commands catch an error only to say more or exit with another code."""

    def invoke(self, ctx):
        token = _invocation.set(ctx)  # fail() asks which command runs (does it take --region?)
        try:
            return super().invoke(ctx)
        except AvatarforgeError as exc:
            fail(str(exc))
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # a command's own exit (fail() included) or a usage error: typer prints it
        except Exception as exc:
            # AWS settings missing or wrong, raised by boto3 where no command expected it
            # (e.g. no region, found missing when a client is made): a line, not a traceback
            if aws_hint(exc) is None:
                raise
            fail(str(exc))
        finally:
            _invocation.reset(token)


def step_printers(
    total: int, bar: Bar | None = None
) -> tuple[Callable[[int, str], None], Callable[[int, str, float], None]]:
    """``on_step`` / ``on_done`` for the demos: a rule per step, then what it did and its time.
    ``bar``: the progress bar the steps report to, closed when a step is done."""

    def on_step(i: int, title: str) -> None:
        console.rule(f"[bold]{i}/{total}[/] {title}")

    def on_done(i: int, what: str, seconds: float) -> None:
        if bar is not None:
            bar.close()
        for line in what.splitlines():
            console.print(f"  {line}", soft_wrap=True)
        console.print(f"  [dim]{seconds:.1f} s[/]")

    return on_step, on_done


class Bar:
    """A progress bar on the console for work a person waits on: ``bar(done, total, what)``
    (``total`` 0: a spinner, for work that cannot be counted, e.g. a server starting). Shown
    only on a terminal, and gone when closed (:meth:`close`, or ``done`` reaching ``total``
    with ``close_when_done``): what the step made is printed after it."""

    def __init__(self, *, close_when_done: bool = False) -> None:
        self.close_when_done = close_when_done
        self._progress = None
        self._task = None

    def __call__(self, done: int, total: int, what: str = "") -> None:
        if not console.is_terminal:  # a log or a pipe: the step's own lines say enough
            return
        if self._progress is None:
            self._progress = Progress(
                SpinnerColumn("line"),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(what, total=None)
        self._progress.update(self._task, completed=done, total=total or None, description=what)
        if self.close_when_done and total and done >= total:
            self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def denoising_bar(where: str) -> Callable[[int, int], None]:
    """``on_step`` for :func:`avatarforge.generate.generate_images`: a bar of the denoising
    steps (on a CPU, a 512 px image of a real base takes minutes)."""
    bar = Bar(close_when_done=True)
    return lambda done, total: bar(done, total, f"  denoising on {where}")


def save_images(
    images: Iterable[Image.Image], folder: Path, *, suffix: str = "", image_format: str = "jpeg"
) -> list[Path]:
    """Encode each image and write it as a new ``NN<suffix>.jpg`` (or ``.png``) in ``folder``
    (:func:`write_new_files`: nothing is overwritten); print each path on its own line."""
    ext = "jpg" if image_format == "jpeg" else "png"
    files = []
    for image in images:
        buf = io.BytesIO()
        if image_format == "jpeg":
            image.convert("RGB").save(buf, format="JPEG", quality=95)
        else:
            image.save(buf, format="PNG")
        files.append(buf.getvalue())
    return write_new_files(files, folder, suffix=suffix, ext=ext)


def save_jpeg_bytes(images: Iterable[bytes], folder: Path) -> list[Path]:
    """Write each JPEG exactly as the server sent it (no re-encoding) as a new ``NN.jpg`` in
    ``folder``; print each path on its own line."""
    return write_new_files(images, folder, ext="jpg")


_NUMBERED = re.compile(r"^(\d+)(?!\d)")


def write_new_files(
    files: Iterable[bytes], folder: Path, *, suffix: str = "", ext: str = "jpg"
) -> list[Path]:
    """Write each file to the next number no file in ``folder`` starts with: ``NN<suffix>.<ext>``
    (00, 01, ...; an existing file is never overwritten, also by a writer running at the same
    time: files are created exclusively). Print each path on its own line (plain print: scripts
    read the paths from stdout)."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = {int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))}
    paths, index = [], 0
    for data in files:
        while True:
            while index in taken:
                index += 1
            path = folder / f"{index:02d}{suffix}.{ext}"
            taken.add(index)
            try:
                with open(path, "xb") as f:  # exclusive: fails if it exists, even in a race
                    f.write(data)
                break
            except FileExistsError:
                continue
        print(path)
        paths.append(path)
    return paths


def _option(f: dataclasses.Field, kind: type, panel: str):
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    flag = "--" + f.name.replace("_", "-")
    help_text = meta.get("help") or ""
    if meta.get("choices"):
        # listed, not enforced here: the config's own check names the field in its error
        help_text += f" (one of {', '.join(map(str, meta['choices']))})"
    if kind is bool:
        return typer.Option(
            default, f"{flag}/--no-{flag[2:]}", help=help_text, rich_help_panel=panel
        )
    return typer.Option(
        default, flag, help=help_text, min=meta.get("ge"), max=meta.get("le"), rich_help_panel=panel
    )


def config_options(
    cls: type, *, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None
) -> Callable[[Callable], Callable]:
    """Give a command one ``--option`` per field of the Settings dataclass ``cls`` (default, help,
    bounds from :func:`~avatarforge.settings.setting`); the command takes them as ``**options``.
    ``skip``: fields left out; ``only``: the fields given (the rest left out).

    Typer reads the command's signature, so the fields are added to it in place of ``**options``.
    """
    hints = typing.get_type_hints(cls)  # fields are typed by string (postponed annotations)

    def decorate(func: Callable) -> Callable:
        sig = inspect.signature(func)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        for f in dataclasses.fields(cls):
            if f.name in skip or (only is not None and f.name not in only):
                continue
            if hints[f.name] is dict:  # a JSON object: set in the --config file, not an option
                continue
            option = _option(f, hints[f.name], cls.section)
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hints[f.name]
                )
            )
        func.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return func

    return decorate
