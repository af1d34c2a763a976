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
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AvatarforgeError
from ..safe_tar import UnsafeArchiveError, safe_extract
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


@dataclass
class MMEConfig(Settings):
    section = "mme"
    max_loaded: int = setting(
        8, "models kept loaded; one more evicts the least recently used", ge=1
    )
    # a user package is an adapter (MBs) and a few small files: a GiB is ample, 8 GiB a bomb
    max_member_bytes: int = setting(1024**3, "largest file in a model archive", ge=1)
    max_total_bytes: int = setting(1024**3, "largest unpacked model archive", ge=1)
    load_timeout_s: float = setting(600.0, "wait for one load/unload (SageMaker: 360 s)", ge=1)
    invoke_timeout_s: float = setting(60.0, "wait for one invocation (SageMaker: 60 s)", ge=1)
    max_connections: int = setting(
        64, "connections the front serves at once; one more is answered 503 at once", ge=1
    )
    socket_timeout_s: float = setting(
        30.0, "the front closes a client's connection after this long without a byte", ge=0.1
    )


@dataclass(frozen=True)
class LoadedModel:
    target_model: str
    model_hash: str
    repo_dir: Path  # <root>/<hash>/model: the folder holding the model folder (Triton's "url")
    load_seconds: float  # fetch + extract + Triton load


def model_hash(target_model: str) -> str:
    """The name SageMaker gives a TargetModel on the instance (a hash, path- and name-safe)."""
    return hashlib.sha256(target_model.encode()).hexdigest()[:32]


def check_target_model(target_model: str) -> str:
    if len(target_model) > 1024 or not _TARGET_RE.fullmatch(target_model):  # '$' allows a '\n'
        raise InvalidTargetModelError(
            f"invalid TargetModel {target_model!r}: expected a relative name like "
            "'<user>.tar.gz' (letters, digits, '.', '_', '-', '/' between parts; no '..')"
        )
    return target_model


class MultiModelLoader:
    """Loads TargetModels from ``source`` into Triton's SageMaker front end at ``sagemaker_url``.

    ``root`` plays /opt/ml/models: one ``<hash>/model`` folder per loaded model. Thread-safe:
    loads and evictions are serialised; invocations of loaded models run in parallel, also
    while another model loads.
    """

    def __init__(
        self,
        sagemaker_url: str,
        source: str,
        root: Path,
        config: MMEConfig | None = None,
        *,
        check_model: Callable[[Path, str], None] | None = check_package,
    ) -> None:
        self.config = config or MMEConfig()
        # what a model folder must be to be loaded (name: what the TargetModel says it is);
        # None: any Triton model (the loader plays SageMaker, which loads what it is given)
        self.check_model = check_model
        self.source = source
        self.root = Path(root).resolve()
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
        self._staging: dict[str, threading.Lock] = {}  # one fetch + extract per TargetModel
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
            name_hash = model_hash(target_model)
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
                    self._triton_load(target_model, name_hash, repo_dir)
                    model = LoadedModel(
                        target_model, name_hash, repo_dir, time.perf_counter() - started
                    )
                    with self._lru_lock:
                        self._loaded[target_model] = model
                        self.loads += 1
            except BaseException:
                shutil.rmtree(work if moved else staging, ignore_errors=True)
                raise
            log.info("loaded %s in %.2f s", target_model, model.load_seconds)
            return model

    def _staging_lock(self, target_model: str) -> threading.Lock:
        with self._lru_lock:
            return self._staging.setdefault(target_model, threading.Lock())

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
                self.client.unload(model.model_hash, model.target_model)
        finally:
            shutil.rmtree(model.repo_dir.parent, ignore_errors=True)
        log.info("unloaded %s", model.target_model)

    def _touch(self, target_model: str) -> LoadedModel | None:
        with self._lru_lock:
            found = self._loaded.get(target_model)
            if found is not None:
                self._loaded.move_to_end(target_model)
            return found

    def unload_all(self, wait_s: float = 5.0) -> list[str]:
        """Unload every model (at shutdown); returns those left to the server's own stop.

        A model with a request in flight is waited for at most ``wait_s`` in all: Triton's
        unload waits for its requests, so one long generation would hold the shutdown for as
        long as it runs. Those still busy then have only their files removed; stopping
        tritonserver ends their requests (``--exit-timeout-secs``) and processes.
        """
        deadline = time.monotonic() + wait_s
        with self._lru_lock:
            while any(self._in_flight.get(t) for t in self._loaded):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
        left_busy = []
        # One at a time: Triton's front end holds its model-list lock through each unload.
        for target in self.loaded():
            busy = bool(self._in_flight.get(target))
            if self.unload(target, in_triton=not busy) and busy:
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
                response = self.client.invoke(model.model_hash, target_model, body, content_type)
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
                raise InvokeError(
                    f"invoke {target_model}: HTTP {response.status}: {error_message(response)}",
                    response.status,
                )
            return response
        raise InvokeError(f"invoke {target_model}: not found in Triton after loading it", 404)

    def invoke(self, target_model: str, payload: dict[str, Any]) -> dict[str, Any]:
        """KServe v2 JSON in, KServe v2 JSON out."""
        return self.invoke_raw(target_model, json.dumps(payload).encode()).json()

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

    def _triton_load(self, target_model: str, name_hash: str, repo_dir: Path) -> None:
        while True:
            try:
                self.client.load(name_hash, str(repo_dir), target_model)
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
