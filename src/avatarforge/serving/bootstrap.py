"""A user model's start-up on a stock Triton image: the standard library only.

Every packaged user model carries a copy of this file (``1/avatarforge_bootstrap.py``) and runs
it from ``initialize()`` under the Python that Triton's python backend stub embeds — on the
SageMaker Triton image a system Python with numpy and nothing else: no boto3, no avatarforge,
no torch. It does what the first model on a fresh instance must do before the shared base can
start, and nothing more, so a resident user model stays a ~20 MB process:

1. read the instance's settings from the environment (never from a packaged config: a
   tarball cannot redirect where the instance keeps or fetches its shared files);
2. make the serving environment present: a local folder is used where it is; a tarball (a
   path, or ``s3://``: a SigV4-signed GET with the instance's credentials, sha256 checked) is
   extracted once per instance into the shared dir (beside, renamed into place, one at a time
   behind a file lock), so Triton gets a folder — and it is refused when it was built for
   another Python than this stub's;
3. start the one shared base model (``pb_utils.load_model``) in that environment unless it is
   running; the shared base fetches and checks the base weights itself, with the full library.

It must run on any Python a Triton image ships (3.10 on 24.10 and older, 3.12 after): no
syntax newer than 3.8 (annotations are strings), imports of the standard library only.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import hmac
import json
import os
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlparse

# The instance's environment (the SageMaker Model's Environment; the local launchers set the
# same). Instance settings come from here only, never from a packaged config.
ENV_SHARED_DIR = "AVATARFORGE_SHARED_DIR"  # where the shared base and serving env live
ENV_BASE_SOURCE = "AVATARFORGE_BASE_SOURCE"  # base weights: folder, tarball or s3:// URI
ENV_ENV_SOURCE = "AVATARFORGE_ENV_SOURCE"  # serving env: folder, tar.gz or s3:// URI
ENV_ENV_SHA256 = "AVATARFORGE_ENV_SHA256"  # sha256 of the env tarball (checked after fetch)
ENV_ENV_PYTHON = "AVATARFORGE_ENV_PYTHON"  # "3.12": must be the Python of the Triton stub

# Files of a packaged user model, beside its model.py.
SHARED_BASE_FILE = "shared_base.json"  # the shared base's config, written by the packager
ADAPTER_SUBDIR = "adapter"
ADAPTER_METADATA = "avatarforge_adapter.json"
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_INPUT = "adapter"  # the shared base's input naming the calling user's adapter folder
# Starts the message of an error that is the caller's fault. Triton 2.51's BLS hands a user
# model every error of the shared base with the code INTERNAL (checked), so the code travels in
# the message: the user model answers INVALID_ARG (HTTP 400) for these, INTERNAL (500) otherwise.
CLIENT_FAULT_PREFIX = "invalid request: "
# Starts the message of an error the client should meet by sending the request again later:
# UNAVAILABLE (HTTP 503), carried the same way.
RETRY_PREFIX = "unavailable: "
# What a request that met a dead shared base process answers: the process is started again at
# once, so the same request succeeds when sent again.
BASE_RESTARTED = RETRY_PREFIX + "the shared base model's process died and was restarted; retry"
# The shared base's input with the time (unix seconds, as text) after which the calling user
# model's client no longer waits: the user model's arrival time + serving.request_timeout_s.
DEADLINE_INPUT = "deadline"
# The shared base's model.py, as handed to pb_utils.load_model: it runs in the serving env,
# where avatarforge is installed, so it always matches the library there.
SHARED_BASE_MODEL_PY = (
    b"from avatarforge.serving.triton_models.shared_base import TritonPythonModel  # noqa: F401\n"
)

LOCK_TIMEOUT_S = 1800.0  # a multi-GB env from S3 takes minutes; longer means a stuck peer
DEFAULT_SHARED_DIR = "~/.cache/avatarforge/shared"
_CHUNK = 1 << 20


class BootstrapError(RuntimeError):
    """The model cannot start on this instance; the message says what to change."""


def stub_python() -> str:
    """The Python of this process: on Triton, the one the python backend stub embeds."""
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


# ---------------------------------------------------------------- instance settings


class Instance:
    """What the instance's environment says (read once per model)."""

    def __init__(self, environ: dict | None = None) -> None:
        env = os.environ if environ is None else environ
        self.shared_dir = Path(env.get(ENV_SHARED_DIR) or DEFAULT_SHARED_DIR).expanduser()
        self.base_source = env.get(ENV_BASE_SOURCE, "")
        self.env_source = env.get(ENV_ENV_SOURCE, "")
        self.env_sha256 = env.get(ENV_ENV_SHA256, "").lower()
        self.env_python = env.get(ENV_ENV_PYTHON, "")


def check_env_python(env_python: str, source: str) -> None:
    """Refuse a serving env built for another Python than this stub's: Triton would start it and
    every import in it would fail, far from the cause."""
    if env_python and env_python != stub_python():
        raise BootstrapError(
            f"serving environment {source} was built for Python {env_python}, but this Triton "
            f"image's python backend runs Python {stub_python()}: build it for {stub_python()} "
            "(conda_envs/build_in_image.sh <triton image tag>) and deploy again"
        )


# Written last into an extracted serving env: the folder is complete (and how it was made).
ENV_READY_FILE = ".avatarforge-env.json"
CONDA_UNPACK_TIMEOUT_S = 600.0


def ensure_env(instance: Instance) -> str:
    """The EXECUTION_ENV_PATH of the shared base ("" when none is configured: inherit).

    Triton is always handed a folder. A local folder (with ``bin/activate``) is used where it
    is. A tarball — a local path, or ``s3://`` (downloaded once, sha256 checked) — is extracted
    once per instance to ``<shared_dir>/env/serve-<key>/``: given the tarball, Triton would
    extract it again at every server start, into a temp folder of its own (python_backend
    pb_env.cc), which is minutes for a multi-GB CUDA env.
    """
    source = instance.env_source
    if not source:
        return ""
    check_env_python(instance.env_python, source)
    local = None
    if source.startswith("s3://"):
        key = instance.env_sha256[:16] or hashlib.sha256(source.encode()).hexdigest()[:16]
    else:
        local = Path(source[len("file://") :] if source.startswith("file://") else source)
        local = local.expanduser()
        if local.is_dir():
            if not (local / "bin" / "activate").is_file():
                raise BootstrapError(f"serving environment {local} has no bin/activate")
            return str(local.resolve())
        if not local.exists():
            raise BootstrapError(f"serving environment {local} does not exist")
        stat = local.stat()  # without a sha256, a rebuilt tarball is a new env (as for Triton)
        identity = f"{local.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        key = instance.env_sha256[:16] or hashlib.sha256(identity.encode()).hexdigest()[:16]
    folder = Path(os.path.abspath(instance.shared_dir / "env" / f"serve-{key}"))
    if (folder / ENV_READY_FILE).is_file():
        return str(folder)
    with file_lock(instance.shared_dir, "env-" + key):
        if not (folder / ENV_READY_FILE).is_file():  # a peer may have finished meanwhile
            _sweep(folder)
            tarball = local or folder.with_name(folder.name + ".tar.gz")
            sha_ok = not instance.env_sha256 or (
                tarball.is_file() and _file_sha256(tarball) == instance.env_sha256
            )
            if local is None and not (tarball.is_file() and sha_ok):
                # (a tarball already here is a whole download whose extraction did not finish)
                download(source, tarball, sha256=instance.env_sha256 or None)
            elif not sha_ok:
                raise BootstrapError(f"{local}: sha256 is not {instance.env_sha256}")
            record = {"source": source, "sha256": instance.env_sha256}
            unpack_env(tarball, folder, record)
            if local is None:
                tarball.unlink()  # the folder is what runs; the tarball would double the disk
    return str(folder)


def _sweep(folder: Path) -> None:
    """Remove what a killed start left of ``folder`` (its lock is held): a half-made folder,
    its staging folders, a partial download."""
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    for leftover in folder.parent.glob(f".{folder.name}.*tmp-*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unpack_env(tarball: Path, folder: Path, record: dict) -> None:
    """Make ``folder`` the serving env in ``tarball`` (the caller holds its lock).

    Extracted beside ``folder`` and renamed into place; then a conda-pack env's own
    ``bin/conda-unpack`` runs in the final folder (it rewrites the build prefix to the folder
    it sits in, so not in the staging one); ``ENV_READY_FILE`` is written last, and only a
    folder that has it is used.
    """
    import shutil

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _extract_env(tarball, staging)
        if not (staging / "bin" / "activate").is_file():
            # both Triton 2.51 and 2.61 refuse an EXECUTION_ENV_PATH without it
            raise BootstrapError(f"serving environment {tarball} has no bin/activate")
        os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        _conda_unpack(folder)
        (folder / ENV_READY_FILE).write_text(json.dumps(record, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _extract_env(tarball: Path, dest: Path) -> None:
    import tarfile

    dest.mkdir()
    # "tar" filter where this Python has one (3.8.17+, 3.10.12+, 3.12): no setuid bits, nothing
    # outside dest; links may point anywhere, which a venv needs (bin/python -> /usr/bin/...).
    options = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
    try:
        with tarfile.open(tarball, "r:*") as tar:
            tar.extractall(dest, members=_env_members(tar, tarball), **options)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BootstrapError(f"cannot extract serving environment {tarball}: {exc}") from None


def _env_members(tar, tarball: Path):
    """The tarball's members, each checked before it is written: only files, folders and links,
    all named inside the folder (no ``..``); nothing written at or below a link the tarball
    made, so a link cannot carry a later member outside."""
    links = set()

    def inside(name: str) -> str:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if name.startswith("/") or ".." in parts:
            raise BootstrapError(f"serving environment {tarball}: {name!r} is outside it")
        if any("/".join(parts[:i]) in links for i in range(1, len(parts) + 1)):
            raise BootstrapError(f"serving environment {tarball}: {name!r} is at or below a link")
        return "/".join(parts)

    for member in tar:
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            raise BootstrapError(f"serving environment {tarball}: {member.name!r} is no file")
        name = inside(member.name)
        if member.islnk():
            inside(member.linkname)
        if member.issym():
            links.add(name)
        yield member


def _conda_unpack(folder: Path) -> None:
    """Run a conda-pack env's ``bin/conda-unpack`` (a Python script) with the env's own Python.

    conda-pack leaves the build prefix in text files (scripts, sysconfig data, .pc files);
    conda-unpack rewrites it to where the env now is. Triton never runs it, neither does its
    ``bin/activate`` (which Triton 25.08+ does not source either)."""
    import subprocess

    script = folder / "bin" / "conda-unpack"
    if not script.is_file():
        return
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in (str(folder / "bin"), env.get("PATH")) if p)
    try:
        result = subprocess.run(
            [str(folder / "bin" / "python"), str(script)],
            cwd=str(folder),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=CONDA_UNPACK_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BootstrapError(f"conda-unpack in {folder} did not run: {exc}") from None
    if result.returncode != 0:
        tail = result.stdout.decode("utf-8", "replace")[-1000:]
        raise BootstrapError(f"conda-unpack in {folder} failed ({result.returncode}): {tail}")


def lock_folder(shared_dir: Path) -> Path:
    """Where the instance's processes keep their lock files: ``<shared_dir>/.locks``, or, when
    the shared dir is read-only (a base and env prepared in the image or on a read-only
    volume), a folder of the machine's temp dir named after it: the processes of one instance
    share that too."""
    folder = Path(shared_dir) / ".locks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            probe = folder / f".probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
            return folder
    except OSError:
        pass
    import tempfile

    key = hashlib.sha256(str(Path(shared_dir).resolve()).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"avatarforge-locks-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def file_lock(shared_dir: Path, name: str, timeout: float = LOCK_TIMEOUT_S):
    """An exclusive lock between the processes of one instance (models start in parallel)."""
    folder = lock_folder(shared_dir)
    deadline = time.monotonic() + timeout
    with open(folder / (name + ".lock"), "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise BootstrapError(
                        f"timed out after {timeout:.0f} s waiting for lock {name}"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- the shared base


class SharedBaseModel:
    """How to start the shared base model: its name, its config (JSON) and its model.py."""

    def __init__(self, name: str, config_json: str, lock_dir: Path) -> None:
        self.name = name
        self.config_json = config_json
        self.lock_dir = lock_dir

    @property
    def request_timeout_s(self) -> float:
        """serving.request_timeout_s of the package (0: none), as the packager wrote it."""
        params = json.loads(self.config_json).get("parameters", {})
        return float(params.get("REQUEST_TIMEOUT_S", {}).get("string_value") or 0)

    @classmethod
    def from_template(cls, template: dict, env_path: str, lock_dir: Path) -> SharedBaseModel:
        """The packaged config of the shared base, given this instance's environment path."""
        config = json.loads(json.dumps(template))  # a deep copy of plain JSON
        params = config.setdefault("parameters", {})
        params.pop("EXECUTION_ENV_PATH", None)
        if env_path:
            params["EXECUTION_ENV_PATH"] = {"string_value": env_path}
        return cls(config["name"], json.dumps(config, sort_keys=True), Path(lock_dir))

    def ensure_loaded(self, pb_utils) -> None:
        """Start the shared base unless it is ready (``pb_utils``: the caller's Triton module).

        The lock makes concurrent first loads start it once; models call this per batch, so
        the shared base comes back if something unloaded it.
        """
        if pb_utils.is_model_ready(self.name):
            return
        with file_lock(self.lock_dir, self.name, timeout=600):
            if not pb_utils.is_model_ready(self.name):
                self._load(pb_utils)

    def restart(self, pb_utils, failed_at: float) -> None:
        """Replace a shared base whose process died (e.g. the OOM killer).

        Triton 2.51's python backend no longer restarts a dead stub: the model stays READY and
        every request fails until it is unloaded (a load of an unchanged config does nothing).
        Once per death: a model whose request failed at ``failed_at`` (time.time()) finds the
        restart another model made after that and does nothing.
        """
        marker = lock_folder(self.lock_dir) / (self.name + ".restarted")
        with file_lock(self.lock_dir, self.name, timeout=600):
            with contextlib.suppress(FileNotFoundError):
                if marker.stat().st_mtime >= failed_at:
                    return
            pb_utils.unload_model(self.name)  # returns at once; the unload goes on
            deadline = time.monotonic() + 120
            while pb_utils.is_model_ready(self.name) and time.monotonic() < deadline:
                time.sleep(0.1)
            self._load(pb_utils)
            marker.touch()

    def _load(self, pb_utils) -> None:
        pb_utils.load_model(
            model_name=self.name,
            config=self.config_json,
            files={"file:1/model.py": SHARED_BASE_MODEL_PY},
        )


def server_cmdline() -> list | None:
    """The arguments of the tritonserver that started this stub (its parent process); None
    where they cannot be read or the parent is not tritonserver."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    cmdline = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    return cmdline if cmdline and cmdline[0].endswith("tritonserver") else None


def _option(cmdline: list, name: str) -> list:
    """Every value of ``--name=value`` / ``--name value`` in ``cmdline``."""
    values = []
    for i, arg in enumerate(cmdline):
        if arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == name and i + 1 < len(cmdline):
            values.append(cmdline[i + 1])
    return values


def check_control_mode(cmdline: list | None) -> None:
    """Refuse to start under a tritonserver that cannot load the shared base.

    The shared base is started with ``pb_utils.load_model``, which needs
    ``--model-control-mode=explicit`` (what SageMaker MME and our launchers use); in the
    default mode ``none`` tritonserver 2.51 aborts at that call (boost lock_exception), far
    from the cause. ``cmdline``: the server's arguments (:func:`server_cmdline`); None: no check.
    """
    if cmdline is None:
        return
    mode = (_option(cmdline, "--model-control-mode") or ["none"])[-1]
    if mode != "explicit":
        raise BootstrapError(
            f"tritonserver runs with --model-control-mode={mode}: avatarforge models start the "
            "shared base model themselves, which needs --model-control-mode=explicit; start "
            "it with --model-control-mode=explicit and --load-model=NAME for each model to "
            "load at start (avatarforge serve local-triton does this)"
        )


def loaded_at_start(model: str, cmdline: list | None) -> bool:
    """Whether the server loads ``model`` as it starts (``--load-model``). Then the shared base
    starts with the first request: a model asking Triton about other models before the server
    is up gets "Server not ready", and tritonserver 2.51 may abort (boost lock_exception)."""
    return bool(cmdline) and bool({model, "*"} & set(_option(cmdline, "--load-model")))


def read_user_model(version_dir: Path, base_hash: str) -> Path:
    """The packaged adapter folder of a user model, checked against its config's base hash.

    The shared base verifies the weights' sha256 when it loads them; this fails a model that
    cannot work at load time, with the reason, instead of at its first request.
    """
    folder = Path(version_dir) / ADAPTER_SUBDIR
    for name in (ADAPTER_METADATA, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise BootstrapError(f"{folder} is not a complete adapter: {name} is missing")
    try:
        meta = json.loads((folder / ADAPTER_METADATA).read_text())
    except ValueError as exc:
        raise BootstrapError(f"{folder / ADAPTER_METADATA}: not valid JSON ({exc})") from None
    if not base_hash:
        raise BootstrapError("BASE_HASH is missing from the user model's config parameters")
    if not isinstance(meta, dict) or meta.get("base_hash") != base_hash:
        trained = meta.get("base_hash") if isinstance(meta, dict) else None
        raise BootstrapError(
            f"adapter was trained on base {str(trained)[:12]}, but this model is configured "
            f"for base {base_hash[:12]}"
        )
    return folder.resolve()


def error_code(message: str, pb_utils) -> int:
    """The Triton error code for an error message of the shared base (see CLIENT_FAULT_PREFIX)."""
    if message.startswith(CLIENT_FAULT_PREFIX):
        return pb_utils.TritonError.INVALID_ARG
    if message.startswith(RETRY_PREFIX):
        return pb_utils.TritonError.UNAVAILABLE
    return pb_utils.TritonError.INTERNAL


def base_died(message: str) -> bool:
    """Whether a BLS error says the shared base's process is gone (Triton's own words)."""
    return message.startswith("Stub process") and "is not healthy" in message


def start(version_dir: Path, params: dict, pb_utils, environ: dict | None = None):
    """Everything a user model's ``initialize()`` does: returns (adapter folder, shared base).

    ``params``: the model config's parameters as plain strings.
    """
    version_dir = Path(version_dir)
    cmdline = server_cmdline()
    check_control_mode(cmdline)
    adapter = read_user_model(version_dir, params.get("BASE_HASH", ""))
    instance = Instance(environ)
    template = json.loads((version_dir / SHARED_BASE_FILE).read_text())
    base = SharedBaseModel.from_template(template, ensure_env(instance), instance.shared_dir)
    if not loaded_at_start(version_dir.parent.name, cmdline):
        base.ensure_loaded(pb_utils)
    return adapter, base


def model_params(model_config_json: str) -> dict:
    """A model config's parameters as plain strings (Triton's string_value form)."""
    config = json.loads(model_config_json)
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


# ---------------------------------------------------------------- S3 without boto3

# A whole download, retries included; below LOCK_TIMEOUT_S, so a model waiting for a peer's
# download hears of its failure instead of timing out on the lock.
DOWNLOAD_DEADLINE_S = 1200.0
_READ_TIMEOUT_S = 60.0


def download(
    uri: str,
    dest: Path,
    sha256: str | None = None,
    retries: int = 4,
    deadline_s: float = DOWNLOAD_DEADLINE_S,
) -> Path:
    """Download ``s3://bucket/key`` to ``dest`` atomically; checks ``sha256`` when given.

    Signed with SigV4 and the instance's credentials (environment, container credentials, or
    the instance metadata service: the order boto3 uses). Server errors, broken connections and
    bodies shorter than their Content-Length are retried with exponential backoff; a missing
    object, a refused request or a redirect is not. Everything, retries included, ends by
    ``deadline_s``.
    """
    import http.client
    import urllib.error

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    deadline = time.monotonic() + deadline_s
    delay = 1.0
    try:
        for attempt in range(retries + 1):
            try:
                actual = _get_to_file(uri, tmp, deadline, deadline_s)
                break
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or attempt == retries:
                    raise BootstrapError(_http_failure(uri, exc)) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                if attempt == retries:
                    raise BootstrapError(f"cannot download {uri}: {exc}") from None
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
            delay *= 2
        if sha256 and actual != sha256.lower():
            raise BootstrapError(f"{uri}: sha256 is {actual}, expected {sha256.lower()}")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest


def _http_failure(uri: str, exc) -> str:
    detail = ""
    with contextlib.suppress(Exception):
        detail = exc.read(2000).decode("utf-8", "replace")
    reason = {403: "access denied (check the instance role's s3:GetObject)", 404: "no such object"}
    if exc.code in (301, 307):  # S3 names the bucket's region; we never re-send the signed GET
        where = exc.headers.get("x-amz-bucket-region") if exc.headers else None
        fix = f"set AWS_REGION={where}" if where else "set AWS_REGION to the bucket's region"
        reason[exc.code] = f"the bucket is in another region: {fix} (redirect not followed)"
    detail = " ".join(detail.split())[:300]
    return f"cannot download {uri}: HTTP {exc.code}, {reason.get(exc.code, '')} {detail}"


def _opener():
    """urllib without redirects: a 3xx is an HTTPError. urllib would re-send every header,
    Authorization and the session token included, to whatever host the Location names."""
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            return None

    return urllib.request.build_opener(NoRedirect)


def _get_to_file(uri: str, path: Path, deadline: float, deadline_s: float) -> str:
    import urllib.request

    def check_deadline():
        if time.monotonic() > deadline:
            raise BootstrapError(f"cannot download {uri}: not done after {deadline_s:.0f} s")

    check_deadline()
    url, headers = signed_get(uri, credentials(), region())
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers=headers, method="GET")
    # The timeout bounds each wait for bytes; the deadline, checked after every read, bounds
    # the whole: a server that sends a byte now and then never trips a per-read timeout.
    timeout = max(0.1, min(_READ_TIMEOUT_S, deadline - time.monotonic()))
    received = 0
    with _opener().open(request, timeout=timeout) as response, open(path, "wb") as out:
        length = response.headers.get("Content-Length")
        read = getattr(response, "read1", response.read)  # read1: what one recv brings
        while True:
            try:
                chunk = read(_CHUNK)
            except OSError:
                check_deadline()
                raise
            check_deadline()
            if not chunk:
                break
            received += len(chunk)
            digest.update(chunk)
            out.write(chunk)
    # urllib reports a body cut short as a normal end: only the length can tell
    if length is None or not length.isdigit() or received != int(length):
        raise OSError(f"connection closed after {received} of {length or '?'} bytes")
    return digest.hexdigest()


def region(environ: dict | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_url(bucket: str, key: str, region_name: str, environ: dict | None = None) -> str:
    """Where to GET an object: a configured endpoint (path style, e.g. a local moto server),
    else the regional virtual-hosted endpoint (path style for bucket names with dots)."""
    env = os.environ if environ is None else environ
    path = "/" + quote(key, safe="/~")
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        return endpoint.rstrip("/") + "/" + quote(bucket) + path
    if "." in bucket:
        return f"https://s3.{region_name}.amazonaws.com/{bucket}{path}"
    return f"https://{bucket}.s3.{region_name}.amazonaws.com{path}"


def signed_get(
    uri: str, creds: dict, region_name: str, now: datetime.datetime | None = None
) -> tuple[str, dict]:
    """(url, headers) of a SigV4-signed S3 GET of ``s3://bucket/key``."""
    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if parsed.scheme != "s3" or not bucket or not key:
        raise BootstrapError(f"not an s3://bucket/key URI: {uri!r}")
    url = s3_url(bucket, key, region_name)
    target = urlparse(url)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    scope = f"{amz_date[:8]}/{region_name}/s3/aws4_request"
    headers = {
        "host": target.netloc,
        "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
        "x-amz-date": amz_date,
    }
    if creds.get("token"):
        headers["x-amz-security-token"] = creds["token"]
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [
            "GET",
            target.path,  # already URI-encoded once, as S3 wants it
            "",
            "".join(f"{k}:{headers[k].strip()}\n" for k in sorted(headers)),
            signed,
            "UNSIGNED-PAYLOAD",
        ]
    )
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key_bytes = ("AWS4" + creds["secret_key"]).encode()
    for part in (amz_date[:8], region_name, "s3", "aws4_request"):
        key_bytes = hmac.new(key_bytes, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key_bytes, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={creds['access_key']}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    headers.pop("host")  # urllib sends it from the URL
    return url, headers


def credentials(environ: dict | None = None) -> dict:
    """The instance's AWS credentials, looked up in the order boto3 uses: environment
    variables, the container credentials endpoint, then the instance metadata service (v2)."""
    env = os.environ if environ is None else environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return {
            "access_key": env["AWS_ACCESS_KEY_ID"],
            "secret_key": env["AWS_SECRET_ACCESS_KEY"],
            "token": env.get("AWS_SESSION_TOKEN", ""),
        }
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI"
    ):
        return _container_credentials(env)
    return _imds_credentials(env)


def _http_json(url: str, headers: dict | None = None, method: str = "GET", timeout=2.0):
    import urllib.request

    request = urllib.request.Request(url, headers=headers or {}, method=method)
    with _opener().open(request, timeout=timeout) as response:  # the token stays with its host
        body = response.read().decode()
    return json.loads(body) if body.lstrip().startswith("{") else body


def _from_aws_json(data: dict, where: str) -> dict:
    try:
        return {
            "access_key": data["AccessKeyId"],
            "secret_key": data["SecretAccessKey"],
            "token": data.get("Token", ""),
        }
    except (KeyError, TypeError):
        raise BootstrapError(f"no credentials in the answer of {where}") from None


def _container_credentials(env: dict) -> dict:
    relative = env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    url = (
        "http://169.254.170.2" + relative if relative else env["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
    )
    headers = {}
    token = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
    if env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"):
        token = Path(env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]).read_text().strip()
    if token:
        headers["Authorization"] = token
    try:
        return _from_aws_json(_http_json(url, headers), url)
    except OSError as exc:
        raise BootstrapError(f"cannot read container credentials from {url}: {exc}") from None


def _imds_credentials(env: dict) -> dict:
    base = env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254").rstrip("/")
    try:
        token = _http_json(
            base + "/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
            method="PUT",
        )
        headers = {"X-aws-ec2-metadata-token": token}
        roles = _http_json(base + "/latest/meta-data/iam/security-credentials/", headers)
        role = roles.split()[0]
        data = _http_json(base + "/latest/meta-data/iam/security-credentials/" + role, headers)
    except (OSError, IndexError, AttributeError) as exc:
        raise BootstrapError(
            "no AWS credentials: none in the environment, no container credentials endpoint, "
            f"and the instance metadata service did not answer ({exc})"
        ) from None
    return _from_aws_json(data, base)
