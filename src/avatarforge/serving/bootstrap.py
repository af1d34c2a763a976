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

Steps 2 and 3 run in a thread of the user model (:class:`BaseStarter`), so the model loads in a
second; its requests wait for the shared base up to 90% of the instance's request timeout and
are then answered "unavailable: ... retry" (:class:`UserModel`). Every request to the shared
base carries the instance's proof that one of its user models sent it (:func:`caller_mac`), and
every answer is counted per user and outcome (:class:`RequestCounters`).

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
import logging
import os
import stat
import sys
import threading
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
# serving.request_timeout_s of the instance (avatarforge.serving.config.ServingConfig, where it
# is documented: the user model reads it here, without the library; a test keeps them equal)
ENV_REQUEST_TIMEOUT_S = "AVATARFORGE_SERVING_REQUEST_TIMEOUT_S"
DEFAULT_REQUEST_TIMEOUT_S = 60
ENV_METRICS_LOG_S = "AVATARFORGE_SERVING_METRICS_LOG_S"  # likewise serving.metrics_log_s
DEFAULT_METRICS_LOG_S = 60
MAX_SECONDS = 86400  # the bound of both

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
# What the shared base answers while its pipeline loads (the user model waits and sends again),
# and what a user model answers when the shared base is not up within its wait.
BASE_LOADING = RETRY_PREFIX + "the shared base model is loading"
BASE_STARTING = RETRY_PREFIX + "the shared base model is starting on this instance"
BASE_NOT_READY = RETRY_PREFIX + "the shared base model is not ready"
# A request waits at most this share of the request timeout for the shared base to come up,
# so that its answer (a retry) reaches the client before the client stops waiting.
WAIT_SHARE = 0.9
RESTART_AFTER_S = 30.0  # a shared base that failed to start is tried again after this long
# The shared base's input with the time (unix seconds, as text) after which the calling user
# model's client no longer waits: the user model's arrival time + serving.request_timeout_s.
DEADLINE_INPUT = "deadline"
# The shared base's input proving that a user model of this instance sent the request:
# caller_mac() over its adapter folder and deadline, with the instance's key (KEY_FILE).
AUTH_INPUT = "auth"
KEY_FILE = "bls.key"  # in the lock folder, mode 0600: read by the instance's processes only
# The one answer to a request the shared base refuses as not from this instance's user models
# (no auth, a wrong one, no deadline, an adapter folder that is not a served user model's):
# it says nothing about why, so it cannot tell a caller whether a path exists.
CALLER_REFUSED = CLIENT_FAULT_PREFIX + "the shared base answers only this instance's user models"
# Triton's own words for "no such model, or not ready": 2.51's BLS says "Model 'x' is not
# ready." (its readiness check can miss a loaded model while another model loads: an unlocked
# read of the model map, core ModelRepositoryManager::FindModelIdentifier); cores from mid-2026
# raise "Request for unknown model: 'x' ..." from is_model_ready instead of returning False.
UNKNOWN_MODEL = "Request for unknown model"
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
        self.request_timeout_s = _seconds(env, ENV_REQUEST_TIMEOUT_S, DEFAULT_REQUEST_TIMEOUT_S, 1)
        self.metrics_log_s = _seconds(env, ENV_METRICS_LOG_S, DEFAULT_METRICS_LOG_S, 0)


def _seconds(env, name: str, default: int, least: int) -> float:
    text = env.get(name, "").strip()
    if not text:
        return float(default)
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not least <= value <= MAX_SECONDS:
        raise BootstrapError(f"{name}={text!r}: whole seconds from {least} to {MAX_SECONDS}")
    return float(value)


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
    if source:
        check_env_python(instance.env_python, source)
    if (found := present_env(instance)) is not None:
        return found
    local, folder = _env_place(instance)
    with file_lock(instance.shared_dir, "env-" + folder.name.removeprefix("serve-")):
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


def present_env(instance: Instance) -> str | None:
    """What :func:`ensure_env` returns, when that needs no work (nothing to fetch or extract);
    else None. A few stats: fit for a user model's ``initialize()``."""
    local, folder = _env_place(instance)
    if folder is None:
        return str(local or "")
    return str(folder) if (folder / ENV_READY_FILE).is_file() else None


def _env_place(instance: Instance) -> tuple[Path | None, Path | None]:
    """(the local env folder or tarball, the folder a tarball is extracted to): (None, None)
    with no env configured, (folder, None) for a local folder used where it is."""
    source = instance.env_source
    if not source:
        return None, None
    local = None
    if source.startswith("s3://"):
        key = instance.env_sha256[:16] or hashlib.sha256(source.encode()).hexdigest()[:16]
    else:
        local = Path(source[len("file://") :] if source.startswith("file://") else source)
        local = local.expanduser()
        if local.is_dir():
            if not (local / "bin" / "activate").is_file():
                raise BootstrapError(f"serving environment {local} has no bin/activate")
            return local.resolve(), None
        if not local.exists():
            raise BootstrapError(f"serving environment {local} does not exist")
        stat = local.stat()  # without a sha256, a rebuilt tarball is a new env (as for Triton)
        identity = f"{local.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        key = instance.env_sha256[:16] or hashlib.sha256(identity.encode()).hexdigest()[:16]
    return local, Path(os.path.abspath(instance.shared_dir / "env" / f"serve-{key}"))


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


# ---------------------------------------------------------------- the instance's key


def instance_key(shared_dir: Path) -> bytes:
    """The instance's secret for :func:`caller_mac`: 32 random bytes in ``KEY_FILE`` under the
    lock folder, mode 0600, made by the first process that asks (written whole under another
    name, then linked into place: a reader never sees half a key). Only processes of the
    instance read it (tritonserver and its stubs run as one user); a key file that another
    user owns or may read is refused."""
    folder = lock_folder(shared_dir)
    path = folder / KEY_FILE
    if not path.exists():
        tmp = folder / f".{KEY_FILE}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(os.urandom(32))
            with contextlib.suppress(FileExistsError):  # another process was first: use its
                os.link(str(tmp), str(path))
        finally:
            tmp.unlink()
    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        key = handle.read(64)
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or not stat.S_ISREG(info.st_mode):
        raise BootstrapError(f"{path}: not a key file of this user with mode 0600; remove it")
    if len(key) != 32:
        raise BootstrapError(f"{path}: not a key (expected 32 bytes); remove it")
    return key


def caller_mac(key: bytes, adapter: str, deadline: str) -> str:
    """What a user model sends as ``auth``: HMAC-SHA256 over its adapter folder and deadline."""
    message = f"{adapter}\n{deadline}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


# ---------------------------------------------------------------- the shared base


def model_ready(pb_utils, name: str) -> bool:
    """``pb_utils.is_model_ready(name)``, where a model that is not loaded is False on every
    Triton: up to 2.69 it answers False; cores from mid-2026 (triton-inference-server/core
    73aad7c, 2026-06-09) raise TritonModelException("... Request for unknown model: 'x' is not
    found") from TRITONSERVER_ServerModelIsReady. Other errors ("Server not ready") are raised."""
    try:
        return bool(pb_utils.is_model_ready(name))
    except pb_utils.TritonModelException as exc:
        if UNKNOWN_MODEL in str(exc):
            return False
        raise


class SharedBaseModel:
    """How to start the shared base model: its name, its config (JSON) and its model.py."""

    def __init__(self, name: str, config_json: str, lock_dir: Path) -> None:
        self.name = name
        self.config_json = config_json
        self.lock_dir = lock_dir

    @classmethod
    def from_template(cls, template: dict, env_path: str, lock_dir: Path) -> SharedBaseModel:
        """The shared base's config from a packaged template and this instance's environment
        path. Of the template only the schema and the base are kept: parameters and placement
        are the instance's, so every user model starts the same config (a second user's
        ``load_model`` of a running base then changes nothing, and no package sets limits)."""
        config = json.loads(json.dumps(template))  # a deep copy of plain JSON
        params = config.get("parameters", {})
        config["parameters"] = {k: params[k] for k in ("BASE_ID", "BASE_HASH") if k in params}
        if env_path:
            config["parameters"]["EXECUTION_ENV_PATH"] = {"string_value": env_path}
        config["instance_group"] = [{"kind": "KIND_AUTO", "count": 1}]
        return cls(config["name"], json.dumps(config, sort_keys=True), Path(lock_dir))

    def ensure_loaded(self, pb_utils) -> None:
        """Start the shared base unless it is ready (``pb_utils``: the caller's Triton module).
        The lock makes concurrent first loads start it once."""
        if model_ready(pb_utils, self.name):
            return
        with file_lock(self.lock_dir, self.name, timeout=600):
            if not model_ready(pb_utils, self.name):
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
            while model_ready(pb_utils, self.name) and time.monotonic() < deadline:
                time.sleep(0.1)
            self._load(pb_utils)
            marker.touch()

    def _load(self, pb_utils) -> None:
        pb_utils.load_model(
            model_name=self.name,
            config=self.config_json,
            files={"file:1/model.py": SHARED_BASE_MODEL_PY},
        )


class BaseStarter:
    """Makes the serving environment present and starts the shared base, in a thread.

    A user model's ``initialize()`` only starts it, so the model loads in a second; the env
    download and ``load_model`` (which holds this stub's GIL until the shared base's own
    ``initialize()`` returns: seconds, it loads its pipeline in a thread too) go on meanwhile.
    ``state``: "idle", "starting", "ready" or "failed" (``error`` says why); a failed start is
    tried again by :meth:`start` once RESTART_AFTER_S have passed.
    """

    def __init__(self, template: dict, instance: Instance, pb_utils, log=None) -> None:
        self.name = template["name"]
        self.template, self.instance, self.pb_utils = template, instance, pb_utils
        self.log = log or _log
        self.base = None  # the SharedBaseModel, once the environment is present
        self.state, self.error, self.since = "idle", "", time.monotonic()
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self.state in ("starting", "ready"):
                return
            if self.state == "failed" and time.monotonic() - self.since < RESTART_AFTER_S:
                return
            self.state, self.error, self.since = "starting", "", time.monotonic()
        threading.Thread(target=self._run, name="avatarforge-base-start", daemon=True).start()

    def start_at_load(self) -> None:
        """What a user model's ``initialize()`` does: when the shared base is up already (every
        load but an instance's first), know it now; else :meth:`start` it in a thread.

        Asked here, not in the thread: Triton's name lookup (core
        ``ModelRepositoryManager::FindModelIdentifier``, 2.51 to main) reads the model map
        without its lock while every load and unload replaces that map, and a thread's lookup
        just after ``initialize()`` returns would race the caller's next load or unload (an
        eviction right after a load; make reliability's load/unload cycles every time). During
        ``initialize()`` the load's caller waits, and our loader loads and unloads one at a
        time."""
        try:
            env_path = present_env(self.instance)
            up = env_path is not None and model_ready(self.pb_utils, self.name)
        except Exception:  # the thread meets it again and says why
            up = False
        if not up:
            self.start()
            return
        self.base = SharedBaseModel.from_template(self.template, env_path, self.instance.shared_dir)
        with self._lock:
            self.state, self.error, self.since = "ready", "", time.monotonic()

    def lost(self) -> None:
        """The shared base is not loaded although it was (unloaded behind our back): start it
        again."""
        with self._lock:
            if self.state == "ready":
                self.state = "idle"
        self.start()

    def _run(self) -> None:
        try:
            if self.base is None:
                env_path = ensure_env(self.instance)
                self.base = SharedBaseModel.from_template(
                    self.template, env_path, self.instance.shared_dir
                )
            self.base.ensure_loaded(self.pb_utils)
            state, error = "ready", ""
        except Exception as exc:  # the next request after RESTART_AFTER_S tries again
            state, error = "failed", f"{type(exc).__name__}: {exc}"
            self.log(f"avatarforge: the shared base {self.name} could not start: {error}")
        with self._lock:
            self.state, self.error, self.since = state, error, time.monotonic()


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


def outcome(message: str | None) -> str:
    """What a request's answer counts as (:class:`RequestCounters`): None is a success."""
    if message is None:
        return "served"
    if message.startswith(CLIENT_FAULT_PREFIX):
        return "refused"
    if message.startswith(RETRY_PREFIX + TIMED_OUT):
        return "timed_out"
    if message.startswith(RETRY_PREFIX):
        return "unavailable"
    return "failed"


def base_died(message: str) -> bool:
    """Whether a BLS error says the shared base's process is gone (Triton's own words, bare or
    inside "Failed to process the request(s) for model instance ..., message: ...")."""
    return "Stub process" in message and "is not healthy" in message


def base_not_ready(message: str) -> bool:
    """Whether a BLS error is Triton refusing to reach the shared base as not (yet, or at this
    instant) ready: not one of the shared base's own answers, which carry our prefixes."""
    if message.startswith((CLIENT_FAULT_PREFIX, RETRY_PREFIX)):
        return False
    return "is not ready" in message or UNKNOWN_MODEL in message


def start(
    version_dir: Path, model_config_json: str, pb_utils, text_tensor, environ: dict | None = None
) -> UserModel:
    """Everything a user model's ``initialize()`` does: what can be checked at once is (the
    server's control mode, the adapter against the config's base, the env's Python), then the
    shared base is started in a thread (at the first request when the server loads this model
    as it starts). ``text_tensor(name, text, rows)``: a BYTES input of ``rows`` rows."""
    version_dir = Path(version_dir)
    cmdline = server_cmdline()
    check_control_mode(cmdline)
    params = model_params(model_config_json)
    adapter = read_user_model(version_dir, params.get("BASE_HASH", ""))
    instance = Instance(environ)
    if instance.env_source:
        check_env_python(instance.env_python, instance.env_source)
    template = json.loads((version_dir / SHARED_BASE_FILE).read_text())
    starter = BaseStarter(template, instance, pb_utils)
    user = version_dir.parent.name  # the packaged folder: the user id, on SageMaker too
    config = json.loads(model_config_json)
    model = UserModel(
        user, str(adapter), starter, instance_key(instance.shared_dir), instance,
        Triton(pb_utils, [i["name"] for i in config["input"]], config["output"][0]["name"],
               text_tensor),
        RequestCounters(pb_utils, instance.metrics_log_s),
    )  # fmt: skip
    if not loaded_at_start(user, cmdline):
        starter.start_at_load()
    return model


def model_params(model_config_json: str) -> dict:
    """A model config's parameters as plain strings (Triton's string_value form)."""
    config = json.loads(model_config_json)
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


# ---------------------------------------------------------------- a user model's requests

# DeadlineExceeded's words (avatarforge.serving.handler), after RETRY_PREFIX
TIMED_OUT = "not done within serving.request_timeout_s"


class Triton:
    """What of Triton a user model uses: its module (``pb_utils``), its config's input names and
    output name, and how to make a BYTES input (numpy lives in model.py, not here)."""

    def __init__(self, pb_utils, inputs: list, output: str, text_tensor) -> None:
        self.pb_utils, self.inputs, self.output, self.text_tensor = (
            pb_utils,
            inputs,
            output,
            text_tensor,
        )


class UserModel:
    """A user model's requests: each forwarded to the shared base over BLS with the user's
    adapter folder, deadline and :func:`caller_mac`, and answered with the shared base's
    answer. While the shared base starts or loads, or when Triton's readiness check misses it
    for an instant, the request waits and is sent again, for at most WAIT_SHARE of the request
    timeout; then it is answered UNAVAILABLE ("unavailable: ... retry"), never an error that
    looks final. A dead shared base process is replaced (:meth:`SharedBaseModel.restart`)."""

    def __init__(
        self,
        user: str,
        adapter: str,
        starter: BaseStarter,
        key: bytes,
        instance: Instance,
        triton: Triton,
        counters: RequestCounters,
    ) -> None:
        self.user, self.adapter, self.starter, self.key = user, adapter, starter, key
        self.timeout_s = instance.request_timeout_s
        self.triton, self.counters = triton, counters

    async def execute(self, requests) -> list:
        """The responses to ``requests``, in order."""
        import asyncio

        pb_utils, output = self.triton.pb_utils, self.triton.output
        sent, started = time.time(), time.monotonic()
        self.starter.start()  # no-op when running; the first request of a model loaded at start
        give_up = started + self.timeout_s * WAIT_SHARE
        deadline = f"{sent + self.timeout_s:.3f}"
        auth = caller_mac(self.key, self.adapter, deadline)
        answers: dict = {}
        pending = list(range(len(requests)))
        pause, misses, reason = 0.05, 0, BASE_STARTING
        while pending:
            if self.starter.state != "ready":
                reason = await self._await_start(give_up)
                if reason:
                    break
            calls = [self._forward(requests[i], deadline, auth) for i in pending]
            results = await asyncio.gather(*(c.async_exec() for c in calls))
            again = []
            for i, result in zip(pending, results):
                message = result.error().message() if result.has_error() else None
                if message is None:
                    answers[i] = pb_utils.get_output_tensor_by_name(result, output)
                elif base_died(message):
                    answers[i] = BASE_RESTARTED
                elif message.startswith(BASE_LOADING) or base_not_ready(message):
                    again.append(i)
                    reason = message if message.startswith(RETRY_PREFIX) else BASE_NOT_READY
                else:
                    answers[i] = message
            if any(a == BASE_RESTARTED for a in answers.values()) and self.starter.base:
                self.starter.base.restart(pb_utils, failed_at=sent)
            pending = again
            if not pending or time.monotonic() + pause > give_up:
                break
            if reason == BASE_NOT_READY:
                misses += 1
                if misses >= 3 and self._gone(pb_utils):
                    self.starter.lost()  # really gone, not a missed lookup: start it again
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
        for i in pending:
            answers[i] = self._waited(reason, started)
        return [self._response(answers[i], pb_utils) for i in range(len(requests))]

    def _gone(self, pb_utils) -> bool:
        try:
            return not model_ready(pb_utils, self.starter.name)
        except Exception:  # e.g. "Server not ready" while it stops: nothing to start
            return False

    async def _await_start(self, give_up: float) -> str:
        """ "" once the shared base is up; else, at ``give_up`` or on a failed start, what the
        request is answered."""
        import asyncio

        while self.starter.state == "starting" and time.monotonic() < give_up:
            await asyncio.sleep(0.1)
        if self.starter.state == "ready":
            return ""
        if self.starter.state == "failed":  # why, with the instance's paths: in the log only
            return (
                "the shared base model could not start on this instance (the server's log says "
                f"why); it is tried again {RESTART_AFTER_S:.0f} s after the failure"
            )
        return BASE_STARTING

    def _waited(self, reason: str, started: float) -> str:
        if not reason.startswith(RETRY_PREFIX):
            return reason  # a failed start: the operator's to fix, not the client's to retry
        waited = time.monotonic() - started
        return f"{reason.split(';')[0]} (waited {waited:.0f} s); retry in a few seconds"

    def _forward(self, request, deadline: str, auth: str):
        t = self.triton
        tensors = [t.pb_utils.get_input_tensor_by_name(request, n) for n in t.inputs]
        tensors = [x for x in tensors if x is not None]  # omitted optional inputs stay omitted
        rows = tensors[0].as_numpy().shape[0]
        for name, text in ((ADAPTER_INPUT, self.adapter), (DEADLINE_INPUT, deadline),
                           (AUTH_INPUT, auth)):  # fmt: skip
            tensors.append(t.text_tensor(name, text, rows))
        return t.pb_utils.InferenceRequest(
            model_name=self.starter.name, inputs=tensors, requested_output_names=[t.output]
        )

    def _response(self, answer, pb_utils):
        if not isinstance(answer, str):
            return pb_utils.InferenceResponse(output_tensors=[answer])
        if _own(answer):  # the shared base counts its own answers
            self.counters.add(self.user, outcome(answer))
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(answer, error_code(answer, pb_utils))
        )


def _own(message: str) -> bool:
    """Whether an error answer is the user model's own, not the shared base's."""
    own = (BASE_STARTING, BASE_NOT_READY, BASE_LOADING, BASE_RESTARTED, "the shared base model")
    return message.startswith(own)


# ---------------------------------------------------------------- request counts

METRIC_FAMILY = "avatarforge_requests_total"
FLAGGED = "flagged"  # images (not requests) the safety check replaced (serving.safety_checker)
OUTCOMES = ("served", "refused", "timed_out", "failed", "unavailable", FLAGGED)
EMF_NAMESPACE = "avatarforge"


class RequestCounters:
    """Requests answered, per user and outcome (OUTCOMES), where people look: counters on
    Triton's Prometheus endpoint (``pb_utils.MetricFamily``: /metrics, label ``user`` and
    ``outcome``), and every ``log_every_s`` one line per user in CloudWatch embedded metric
    format on stdout (SageMaker sends the container's output to CloudWatch Logs, which makes
    metrics of it; its Triton runs without a metrics port). Counting never fails a request."""

    def __init__(self, pb_utils=None, log_every_s: float = 60.0, emit=None, clock=time.time):
        self.log_every_s, self.clock = log_every_s, clock
        self.emit = emit or _emf_logger().info  # one line, as CloudWatch Logs reads it
        self._family = None
        if pb_utils is not None:
            try:
                self._family = pb_utils.MetricFamily(
                    name=METRIC_FAMILY,
                    description="avatarforge requests answered, per user and outcome "
                    "(outcome flagged: images the safety check replaced)",
                    kind=pb_utils.MetricFamily.COUNTER,
                )
            except Exception as exc:  # a Triton without custom metrics: the log lines remain
                _log(f"avatarforge: no Prometheus counters ({exc})")
        self._metrics: dict = {}
        self._pending: dict = {}
        self._flushed = clock()
        self._lock = threading.Lock()

    def add(self, user: str, outcome: str, n: int = 1) -> None:
        with self._lock:
            counts = self._pending.setdefault(user, dict.fromkeys(OUTCOMES, 0))
            counts[outcome] += n
            metric = self._metric(user, outcome)
            due = self.log_every_s > 0 and self.clock() - self._flushed >= self.log_every_s
        if metric is not None:
            with contextlib.suppress(Exception):
                metric.increment(n)
        if due:
            self.flush()

    def _metric(self, user: str, outcome: str):
        if self._family is None:
            return None
        key = (user, outcome)
        if key not in self._metrics:
            try:
                self._metrics[key] = self._family.Metric(labels={"user": user, "outcome": outcome})
            except Exception:
                self._metrics[key] = None
        return self._metrics[key]

    def flush(self) -> None:
        """Write the counts since the last flush as embedded-metric-format lines."""
        with self._lock:
            pending, self._pending, self._flushed = self._pending, {}, self.clock()
        if self.log_every_s <= 0:
            return
        for line in emf_lines(pending, self.clock()):
            with contextlib.suppress(Exception):
                self.emit(line)


def emf_lines(counts: dict, now: float) -> list:
    """One CloudWatch embedded-metric-format line per user: its counts per outcome."""
    lines = []
    for user, outcomes in sorted(counts.items()):
        record = {
            "_aws": {
                "Timestamp": int(now * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": EMF_NAMESPACE,
                        "Dimensions": [["user"]],
                        "Metrics": [{"Name": o, "Unit": "Count"} for o in OUTCOMES],
                    }
                ],
            },
            "user": user,
            **{o: outcomes.get(o, 0) for o in OUTCOMES},
        }
        lines.append(json.dumps(record, sort_keys=True))
    return lines


def _emf_logger() -> logging.Logger:
    """The lines CloudWatch reads metrics from: the message alone, on stdout."""
    logger = logging.getLogger("avatarforge.metrics")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def _log(message: str) -> None:
    """A warning in Triton's log (the stub's stderr; Python's own last-resort handler where
    logging is not configured, as in a user model)."""
    logging.getLogger("avatarforge.bootstrap").warning(message)


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
