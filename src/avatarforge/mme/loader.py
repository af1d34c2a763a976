"""What SageMaker does with a TargetModel, against Triton's SageMaker front end.

``invoke(target_model, payload)`` loads the model on first use, as SageMaker does: fetch
``<source>/<target_model>`` (a folder or an ``s3://`` prefix), extract it safely into
``<root>/<hash>/model``, ``POST /models``. At most ``max_loaded`` models stay loaded; loading one
more first unloads the least recently used (``DELETE /models/<hash>``, files removed). A 507
(out of memory) from Triton evicts the least recently used and retries, as SageMaker does.

Before anything is loaded, the archive is checked against the sha256 published with it (S3:
the object's checksum or ``x-amz-meta-sha256`` from the same GET; a local file: its extended
attribute, else ``<target_model>.sha256``; :func:`~avatarforge.storage.fetch_published`),
extracted safely, and its model folder is checked by
``check_model`` (default: :func:`~avatarforge.serving.package_check.check_package`, exactly what
the packager writes; a refused package is a 424 naming what differs). SageMaker itself loads
any tarball in the prefix: the bucket is trusted there; this loader checks anyway.

The archive is fetched and checked before anything is evicted, and outside the lock that
serialises Triton's loads and unloads: a missing or refused TargetModel costs no healthy model
its place, and a slow or large download does not stall other loads. A model with a request in
flight is never chosen for eviction (Triton's unload would wait for that request, up to 350 s,
holding every other load): eviction takes the least recently used idle model, and waits for
one to become idle when all are busy.

A model that answers an invocation with an error starting ``serving.bootstrap.RETRY_PREFIX``
(Triton error UNAVAILABLE: the shared base restarting, a deadline) is a 503 to the caller: send
it again. Triton's SageMaker front end answers it 400, as every model error (2.51,
sagemaker_server.cc), so the loader reads the message. A model whose python stub died (the OOM
killer) answers "Stub process ... is not healthy" for good, and Triton's unload of it never
completes: a request that met the dead stub holds a reference to the model (python_backend
r24.10: the response factory made in ``SaveRequestsToSharedMemory`` is not released when
``ReceiveMessageFromStub`` fails, and Triton core's response factory holds the model), so the
SageMaker front end's DELETE waits its 350 s. The loader leaves that model registered, loads
the TargetModel again under a new Triton name and hash (``<target>.r<n>``), and answers 503;
stopping tritonserver ends the dead one (``--exit-timeout-secs``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AvatarforgeError
from ..paths import build_dir
from ..safe_tar import UnsafeArchiveError, safe_extract
from ..serving.bootstrap import RETRY_PREFIX, UNKNOWN_MODEL
from ..serving.package_check import PackageRefusedError, check_package
from ..settings import Settings, setting
from ..storage import (
    ChecksumFileError,
    ChecksumMismatchError,
    ObjectNotFoundError,
    UnpublishedError,
    fetch_published,
    join_uri,
)
from .protocol import Response, SageMakerTritonClient, TritonMMEError, error_message

log = logging.getLogger(__name__)

# pauses before asking Triton again for a loaded model it did not find (MultiModelLoader._invoke)
LOOKUP_PAUSES_S = (0.05, 0.1, 0.2, 0.4)
STAGING_PREFIX = ".staging-"  # <root>/.staging-<hash>-<random>: a model being fetched

# SageMaker: TargetModel is a relative S3 key under the endpoint's prefix (≤ 1024 chars).
# What of a Triton load error a client is shown: not the Python traceback Triton appends
# ("At:" and the frames), and no server path (each absolute path is cut to its last part).
_TRACEBACK_RE = re.compile(r"\s*\bAt:\s*\n.*", re.S)
_PATH_RE = re.compile(r"(?<![\w.:/])/(?:[^\s/:'\"()]+/)+(?=[^\s/:'\"()]+)")


def client_message(message: str, limit: int = 500) -> str:
    """A Triton load error as a client may read it: the reason, without the traceback and the
    server's paths (the log keeps the whole message)."""
    text = _TRACEBACK_RE.sub("", message.replace("\\n", "\n"))
    text = _PATH_RE.sub(".../", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_TARGET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*\.tar\.gz$")


class MMEError(AvatarforgeError):
    """Base of the loader's errors; ``status`` is the HTTP status a front end should answer."""

    status = 500


class InvalidTargetModelError(MMEError, ValueError):
    status = 400


class UnknownTargetModelError(MMEError, LookupError):
    """The source holds no archive of that name."""

    status = 404


class ModelLoadError(MMEError):
    """The archive was refused, or Triton could not load it (its message is included)."""

    status = 424  # SageMaker's ModelError status


class InvokeError(MMEError):
    """Triton answered an invocation with an error; ``triton_status`` is its HTTP status.

    ``status`` keeps its class: the caller's fault (4xx) is 400, out of memory 507, a failure
    of the model or server (other 5xx) 500.
    """

    def __init__(self, message: str, triton_status: int) -> None:
        super().__init__(message)
        self.triton_status = triton_status
        if triton_status == 507:
            self.status = 507
        elif 400 <= triton_status < 500:
            self.status = 400
        else:
            self.status = 500


class AllModelsBusyError(MMEError):
    """Every loaded model has a request in flight and none became idle in time to be evicted."""

    status = 503


class ModelUnavailableError(MMEError):
    """The model cannot answer now and the same request will succeed later: a 503 to retry
    (its message starts with ``RETRY_PREFIX``, or says the model's process was restarted)."""

    status = 503


class LoadPathError(MMEError):
    """A load url that Triton's SageMaker front end (2.70+) would refuse."""


@dataclass
class MMEConfig(Settings):
    section = "mme"
    max_loaded: int = setting(
        8, "models kept loaded; one more evicts the least recently used", ge=1
    )
    # a user package is an adapter (MBs) and a few small files: a GiB is ample, 8 GiB a bomb
    max_member_bytes: int = setting(1024**3, "largest file in a model archive", ge=1)
    max_total_bytes: int = setting(1024**3, "largest unpacked model archive", ge=1)
    load_timeout_s: float = setting(
        600.0,
        "wait for one load or unload (SageMaker lets a TargetModel load for 360 s, its MME "
        "guide; Triton's SageMaker unload waits up to 350 s)",
        ge=1,
    )
    invoke_timeout_s: float = setting(60.0, "wait for one invocation (SageMaker: 60 s)", ge=1)
    max_connections: int = setting(
        64, "connections the front serves at once; one more is answered 503 at once", ge=1
    )
    socket_timeout_s: float = setting(
        30.0, "the front closes a client's connection after this long without a byte", ge=0.1
    )
    read_deadline_s: float = setting(
        60.0,
        "a client's whole request (head and body) must arrive within this, however slowly it "
        "trickles in; else 408 and the connection is closed",
        ge=0.1,
    )
    models_root: str = setting(
        "", "where models are untarred, as SageMaker's /opt/ml/models; empty: build/mme/models"
    )


@dataclass(frozen=True)
class LoadedModel:
    target_model: str
    model_hash: str
    repo_dir: Path  # <root>/<hash>/model: the folder holding the model folder (Triton's "url")
    load_seconds: float  # fetch + extract + Triton load
    triton_name: str = ""  # Triton's model name: the TargetModel, "<target>.r<n>" once restarted

    def __post_init__(self) -> None:
        if not self.triton_name:
            object.__setattr__(self, "triton_name", self.target_model)


def model_hash(target_model: str) -> str:
    """The name SageMaker gives a TargetModel on the instance (a hash, path- and name-safe)."""
    return hashlib.sha256(target_model.encode()).hexdigest()[:32]


def load_url_pattern(root: Path) -> re.Pattern[str]:
    """The url Triton's SageMaker front end (2.70+) accepts for a load, with ``root`` in place
    of /opt/ml/models: ``(/opt/ml/models/[0-9A-Za-z._]+)/(model)/?([0-9A-Za-z._]+)?``, full
    match (server repository, src/sagemaker_server.h:86 at HEAD)."""
    return re.compile(rf"({re.escape(str(root))}/[0-9A-Za-z._]+)/(model)/?([0-9A-Za-z._]+)?")


# What python_backend answers for a model whose stub process is gone (r24.10 stub_launcher.cc
# and python_be.cc); the quoted name is the model instance's, "<Triton model name>_<n>_<n>".
_STUB_DIED_RE = re.compile(r"Stub process (?:'(?P<instance>[^']*)' )?is not healthy\.?")


def stub_died(message: str, triton_name: str) -> bool:
    """Whether an invocation error says the process of the model ``triton_name`` itself died
    (not that of a model it calls: the shared base's death is the user model's to handle)."""
    found = _STUB_DIED_RE.fullmatch(message.strip())
    return found is not None and (
        found["instance"] is None or found["instance"].startswith(f"{triton_name}_")
    )


def check_target_model(target_model: str) -> str:
    if len(target_model) > 1024 or not _TARGET_RE.fullmatch(target_model):  # '$' allows a '\n'
        raise InvalidTargetModelError(
            f"invalid TargetModel {target_model!r}: expected a relative name like "
            "'<user>.tar.gz' (letters, digits, '.', '_', '-', '/' between parts; no '..')"
        )
    return target_model


class MultiModelLoader:
    """Loads TargetModels from ``source`` into Triton's SageMaker front end at ``sagemaker_url``.

    ``root`` plays /opt/ml/models (default: ``config.models_root``, else build/mme/models):
    one ``<hash>/model`` folder per loaded model. Thread-safe:
    loads and evictions are serialised; invocations of loaded models run in parallel, also
    while another model loads.
    """

    def __init__(
        self,
        sagemaker_url: str,
        source: str,
        root: Path | None = None,
        config: MMEConfig | None = None,
        *,
        check_model: Callable[[Path, str], None] | None = check_package,
    ) -> None:
        self.config = config or MMEConfig()
        # what a model folder must be to be loaded (name: what the TargetModel says it is);
        # None: any Triton model (the loader plays SageMaker, which loads what it is given)
        self.check_model = check_model
        self.source = source
        self.root = Path(
            root or self.config.models_root or build_dir() / "mme" / "models"
        ).resolve()
        self._load_url = load_url_pattern(self.root)
        self.client = SageMakerTritonClient(
            sagemaker_url, self.config.load_timeout_s, self.config.invoke_timeout_s
        )
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # oldest use first
        # _load_lock serialises Triton's loads and unloads; _lru_lock guards the dict and the
        # in-flight counts only, so invocations of loaded models never wait behind a load.
        self._load_lock = threading.RLock()
        self._lru_lock = threading.Lock()
        self._idle = threading.Condition(self._lru_lock)  # notified when a request finishes
        self._in_flight: dict[str, int] = {}
        # one fetch + extract per TargetModel at a time: [lock, users], kept while in use only
        self._staging: dict[str, list] = {}
        # TargetModels loaded again under a new name after their process died: how often
        self._generation: dict[str, int] = {}
        self._dead: list[LoadedModel] = []  # those dead copies, still registered in Triton
        self.loads = self.evictions = 0  # since start: what a load test reports
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep()

    def _sweep(self) -> None:
        """Remove model folders left by an earlier loader on this root (a crash, a kill): no
        model is loaded yet, so each is stale, and Triton never saw them from this loader."""
        stale = [
            p
            for p in self.root.iterdir()
            if re.fullmatch(r"[0-9a-f]{32}", p.name) or p.name.startswith(STAGING_PREFIX)
        ]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        if stale:
            log.info("removed %d stale model folder(s) under %s", len(stale), self.root)

    def loaded(self) -> list[str]:
        """Loaded TargetModels, least recently used first."""
        with self._lru_lock:
            return list(self._loaded)

    def load(self, target_model: str) -> LoadedModel:
        """Load ``target_model`` unless it is loaded; marks it most recently used."""
        check_target_model(target_model)
        if (found := self._touch(target_model)) is not None:
            return found  # the common case never waits for a load in progress
        with self._staging_lock(target_model):
            if (found := self._touch(target_model)) is not None:
                return found  # loaded by another thread meanwhile
            started = time.perf_counter()
            name_hash, triton_name = self._names(target_model)
            work = self.root / name_hash
            # staged in a folder of its own: an eviction of this same TargetModel may still be
            # deleting <root>/<hash> (it runs under the Triton lock, this fetch does not)
            staging = self.root / f"{STAGING_PREFIX}{name_hash}-{uuid.uuid4().hex[:8]}"
            moved = False
            try:
                # fetched and checked before any eviction, outside the Triton lock
                self._fetch_and_extract(target_model, staging)
                with self._load_lock:
                    while len(self.loaded()) >= self.config.max_loaded:
                        self._evict_lru()
                    shutil.rmtree(work, ignore_errors=True)  # stale: nothing of it is loaded
                    staging.rename(work)
                    moved = True
                    repo_dir = work / "model"
                    self._triton_load(target_model, name_hash, repo_dir, triton_name)
                    took = time.perf_counter() - started
                    model = LoadedModel(target_model, name_hash, repo_dir, took, triton_name)
                    with self._lru_lock:
                        self._loaded[target_model] = model
                        self.loads += 1
            except BaseException:
                shutil.rmtree(work if moved else staging, ignore_errors=True)
                raise
            log.info("loaded %s in %.2f s", target_model, model.load_seconds)
            return model

    @contextlib.contextmanager
    def _staging_lock(self, target_model: str) -> Iterator[None]:
        """Held while ``target_model`` is fetched and loaded; its entry lives only while some
        thread holds or waits for it (a name asked for once, 404s included, keeps nothing)."""
        with self._lru_lock:
            entry = self._staging.setdefault(target_model, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lru_lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._staging[target_model]

    def _names(self, target_model: str) -> tuple[str, str]:
        """(hash, Triton model name) of the TargetModel's next load: SageMaker's, until its
        process died and a dead copy holds those names in Triton."""
        generation = self._generation.get(target_model, 0)
        if not generation:
            return model_hash(target_model), target_model
        return model_hash(f"{target_model}\0{generation}"), f"{target_model}.r{generation}"

    def check_load_url(self, repo_dir: Path) -> str:
        """``repo_dir`` as the load's url, if Triton's SageMaker front end would accept it."""
        url = str(repo_dir)
        if not self._load_url.fullmatch(url):
            raise LoadPathError(
                f"load url {url} does not match {self._load_url.pattern} (SageMaker's "
                "/opt/ml/models/<name>/model with this loader's root): Triton 2.70+ refuses it"
            )
        return url

    def unload(self, target_model: str, *, in_triton: bool = True) -> bool:
        """Unload and delete its files; False if it was not loaded. ``in_triton=False``: only
        forget it and delete its files (the server's own stop ends it)."""
        with self._load_lock:
            with self._lru_lock:
                model = self._loaded.pop(target_model, None)
            if model is None:
                return False
            self._unload(model, in_triton=in_triton)
            return True

    def _unload(self, model: LoadedModel, *, in_triton: bool = True) -> None:
        try:
            if in_triton:
                self.client.unload(model.model_hash, model.triton_name)
        finally:
            shutil.rmtree(model.repo_dir.parent, ignore_errors=True)
        log.info("unloaded %s", model.target_model)

    def _touch(self, target_model: str) -> LoadedModel | None:
        with self._lru_lock:
            found = self._loaded.get(target_model)
            if found is not None:
                self._loaded.move_to_end(target_model)
            return found

    def unload_all(self, wait_s: float = 5.0, *, in_triton: bool = True) -> list[str]:
        """Unload every model (at shutdown); returns those left to the server's own stop.

        A model with a request in flight is waited for at most ``wait_s`` in all: Triton's
        unload waits for its requests, so one long generation would hold the shutdown for as
        long as it runs. Those still busy then have only their files removed; stopping
        tritonserver ends their requests (``--exit-timeout-secs``) and processes.
        ``in_triton=False`` (tritonserver is gone): only forget them and delete their files.
        """
        try:
            return self._unload_all(wait_s, in_triton)
        finally:  # the last unload is done: no listing of the repositories follows
            for dead in self._dead:
                shutil.rmtree(dead.repo_dir.parent, ignore_errors=True)

    def _unload_all(self, wait_s: float, in_triton: bool) -> list[str]:
        if not in_triton:
            for target in self.loaded():
                self.unload(target, in_triton=False)
            return []
        deadline = time.monotonic() + wait_s
        with self._lru_lock:
            while any(self._in_flight.get(t) for t in self._loaded):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
        with self._lru_lock:
            busy = [t for t in self._loaded if self._in_flight.get(t)]
            idle = [t for t in self._loaded if t not in busy]
        # One at a time: Triton's front end holds its model-list lock through each unload. The
        # idle first: each unload lists every registered repository and tritonserver 2.51 dies
        # (SIGSEGV) if one is gone, as the folder of a busy model left registered is.
        for target in idle:
            self.unload(target)
        left_busy = []
        for target in busy:
            if self.unload(target, in_triton=False):
                left_busy.append(target)
                log.warning("%s has a request in flight: left to the server's stop", target)
        return left_busy

    def invoke_raw(
        self, target_model: str, body: bytes, content_type: str = "application/json"
    ) -> Response:
        """Load if needed, then invoke; Triton's response as is when it is 200."""
        for attempt in range(2):
            model = self._acquire(target_model)
            try:
                response = self._invoke(model, body, content_type)
            finally:
                self._release(target_model)
            if response.status == 404 and attempt == 0:
                # Gone behind our back (server restarted, unloaded by hand): load it again.
                log.warning("%s was not loaded in Triton; loading it again", target_model)
                with self._load_lock, self._lru_lock:
                    if self._loaded.get(target_model) is model:
                        self._loaded.pop(target_model)
                        shutil.rmtree(model.repo_dir.parent, ignore_errors=True)
                continue
            if response.status != 200:
                message = error_message(response)
                if stub_died(message, model.triton_name):
                    self._restart(target_model, model)
                    raise ModelUnavailableError(
                        f"{RETRY_PREFIX}{target_model}: the model's process died and was "
                        "started again; retry"
                    )
                if message.startswith(RETRY_PREFIX):  # the model says: send it again
                    raise ModelUnavailableError(message)
                raise InvokeError(
                    f"invoke {target_model}: HTTP {response.status}: {message}", response.status
                )
            return response
        raise InvokeError(f"invoke {target_model}: not found in Triton after loading it", 404)

    def _invoke(self, model: LoadedModel, body: bytes, content_type: str) -> Response:
        """Triton's answer for a loaded model. Triton 2.51's core can miss a loaded model's
        name while another model loads or unloads (an unlocked read of its model map) and
        answer "Request for unknown model" (400 through its SageMaker front end; make
        reliability met it once in 800 requests): asked again after a pause, a few times; still
        missed, a 503 for the caller to retry, never a 400."""
        for pause in (*LOOKUP_PAUSES_S, None):
            response = self.client.invoke(model.model_hash, model.triton_name, body, content_type)
            if response.status == 200 or not _lookup_missed(response, model.triton_name):
                return response
            if pause is None:
                break
            log.warning("Triton did not find %s, which is loaded; asking again", model.target_model)
            time.sleep(pause)
        raise ModelUnavailableError(
            f"{RETRY_PREFIX}{model.target_model}: tritonserver did not find the loaded model "
            f"({error_message(response)}); retry"
        )

    def invoke(self, target_model: str, payload: dict[str, Any]) -> dict[str, Any]:
        """KServe v2 JSON in, KServe v2 JSON out."""
        return self.invoke_raw(target_model, json.dumps(payload).encode()).json()

    def _restart(self, target_model: str, dead: LoadedModel) -> None:
        """Load ``target_model`` again under new names; the dead copy stays registered in
        Triton (its unload would wait 350 s, see the module's doc) until the server stops."""
        with self._lru_lock:
            if self._loaded.get(target_model) is not dead:
                return  # restarted already, by another request that met the dead process
            del self._loaded[target_model]
            self._generation[target_model] = self._generation.get(target_model, 0) + 1
            # its files stay while tritonserver runs: the SageMaker front end's unload of any
            # model lists every registered repository, and a missing one crashes it (2.51)
            self._dead.append(dead)
        log.error("the process of %s (%s) died; loading it again", target_model, dead.triton_name)
        try:
            self.load(target_model)
        except Exception as exc:  # the next request loads it, or answers why it cannot
            log.error("loading %s again failed: %s", target_model, exc)

    def in_flight(self, target_model: str) -> int:
        """Requests of ``target_model`` being answered now."""
        with self._lru_lock:
            return self._in_flight.get(target_model, 0)

    def _acquire(self, target_model: str) -> LoadedModel:
        """Load if needed and count a request in flight, atomically with respect to eviction
        (a model evicted between its load and the count is loaded again)."""
        while True:
            model = self.load(target_model)
            with self._lru_lock:
                if self._loaded.get(target_model) is model:
                    self._in_flight[target_model] = self._in_flight.get(target_model, 0) + 1
                    return model

    def _release(self, target_model: str) -> None:
        with self._lru_lock:
            left = self._in_flight.get(target_model, 0) - 1
            if left > 0:
                self._in_flight[target_model] = left
            else:
                self._in_flight.pop(target_model, None)
                self._idle.notify_all()

    def _evict_lru(self) -> None:
        """Unload the least recently used model that has no request in flight; when every
        model is busy, wait (up to the load timeout) for one to finish."""
        deadline = time.monotonic() + self.config.load_timeout_s
        with self._lru_lock:
            while True:
                idle = [t for t in self._loaded if not self._in_flight.get(t)]
                if idle:
                    victim = self._loaded.pop(idle[0])
                    self.evictions += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AllModelsBusyError(
                        f"all {len(self._loaded)} loaded models have requests in flight; "
                        "none could be unloaded to make room (raise max_loaded, or retry)"
                    )
                self._idle.wait(left)
        log.info("evicting least recently used idle model %s", victim.target_model)
        self._unload(victim)

    def _fetch_and_extract(self, target_model: str, work: Path) -> Path:
        """Fetch, check and extract into ``work/model``. What a client is told names the
        TargetModel and the files in the package, never the source or a server folder."""
        archive, repo_dir = work / "archive.tar.gz", work / "model"

        def relative(exc: Exception) -> str:  # the archive: the TargetModel; a file: its path
            text = str(exc).replace(str(archive), target_model)
            return text.replace(f"{repo_dir}/", "").replace(str(work), ".")

        try:
            fetch_published(join_uri(self.source, target_model), archive, name=target_model)
        except ObjectNotFoundError:
            where = "s3:// (the endpoint's model prefix)" if "://" in self.source else "the source"
            raise UnknownTargetModelError(
                f"TargetModel {target_model!r} not found in {where}"
            ) from None
        except (UnpublishedError, ChecksumFileError, ChecksumMismatchError) as exc:
            # the digest must come with the object (one PUT, one rename): a model published as
            # two objects could be read between them, a new tarball beside an old sha256
            raise ModelLoadError(str(exc)) from None
        try:
            safe_extract(
                archive,
                repo_dir,
                max_member_bytes=self.config.max_member_bytes,
                max_total_bytes=self.config.max_total_bytes,
            )
        except UnsafeArchiveError as exc:  # a ValueError: the caller sees why, not where
            raise UnsafeArchiveError(relative(exc)) from None
        archive.unlink()
        configs = sorted(p.parent.name for p in repo_dir.glob("*/config.pbtxt"))
        if len(configs) != 1 or len(list(repo_dir.iterdir())) != 1:
            raise ModelLoadError(
                f"{target_model}: the archive must hold exactly one model folder with a "
                f"config.pbtxt (<name>/config.pbtxt, <name>/1/model.py); found {configs or 'none'}"
            )
        if self.check_model is not None:
            name = target_model.rsplit("/", 1)[-1].removesuffix(".tar.gz")
            try:
                self.check_model(repo_dir / configs[0], name)
            except PackageRefusedError as exc:
                raise ModelLoadError(relative(exc)) from None
            except Exception as exc:  # a hostile package must not become a 500 with a trace
                reference = uuid.uuid4().hex[:12]
                log.exception("checking %s failed (reference %s)", target_model, reference)
                raise ModelLoadError(
                    f"{target_model}: refused, the package could not be checked "
                    f"({type(exc).__name__}; reference {reference} in the server's log)"
                ) from None
        return repo_dir

    def _triton_load(
        self, target_model: str, name_hash: str, repo_dir: Path, triton_name: str
    ) -> None:
        url = self.check_load_url(repo_dir)
        while True:
            try:
                self.client.load(name_hash, url, triton_name)
                return
            except TritonMMEError as exc:
                if exc.status == 507 and self.loaded():
                    log.warning("out of memory loading %s: evicting and retrying", target_model)
                    self._evict_lru()
                    continue
                reference = uuid.uuid4().hex[:12]
                log.error("Triton could not load %s (reference %s): %s", target_model,
                          reference, exc.message or exc)  # fmt: skip
                raise ModelLoadError(
                    f"Triton could not load {target_model!r}: "
                    f"{client_message(exc.message or str(exc))} (reference {reference} in the "
                    "server's log)"
                ) from exc


def _lookup_missed(response: Response, triton_name: str) -> bool:
    """Whether Triton answered that it knows no model of this name (its lookup, not the model)."""
    message = error_message(response)
    return UNKNOWN_MODEL in message and f"'{triton_name}'" in message
