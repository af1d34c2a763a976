"""run_job: one training job from a validated request to a servable ``<user>.tar.gz`` in S3.

fetch photos (limits checked on the listing first) -> preprocess -> train (checkpoints to S3,
stop before the deadline) -> package -> upload the tarball -> write result.json -> delete the
checkpoint. Nothing appears under the model's key unless every step before it succeeded (one
PUT or one completed multipart upload), and every failure raises a :class:`JobError`.

Around that: a job id that already has a result returns it and trains nothing; one job id
never runs twice at once on an instance (a lock) nor on two instances (its claim in S3, which
also binds the job id to one request: :mod:`.claim`); at most ``max_concurrent_jobs`` jobs train
at once (slots; the others wait); a job that starts where an earlier run of the same job id
stopped (deadline, crash, SIGKILL) resumes from its checkpoint. Local files live in one scratch
folder per run, removed on every path; a killed run's folder is removed by the next run of
the same job id.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__, storage
from ..base.identity import BaseInfo
from ..hashing import sha256_file
from .claim import LEASE_GRACE_S, check_same_request, claimed, instance_id, read_claim
from .config import ServiceConfig
from .errors import JobError, JobTimeoutError
from .progress import ProgressReport
from .request import JobRequest, preprocess_config, train_config
from .result import JobResult
from .slots import SlotTimeout, job_is_running, job_lock, training_slot
from .store import JobStore

log = logging.getLogger(__name__)
Clock = Callable[[], float]
# Loading models (transformers/diffusers from_pretrained) switches torch's default device to
# "meta" for the whole process while it runs: a job training in another thread then makes its
# tensors there and fails. So within one process jobs train one at a time; the slots spread
# jobs over processes (DJL runs each worker in its own), where they train side by side.
_TRAINING = threading.Lock()


@dataclass(frozen=True)
class JobEvent:
    """What a running job reports to ``on_event`` (progress output, tests).

    kinds: ``reused`` (an earlier result was returned), ``waiting_for_job``,
    ``waiting_for_slot``, ``slot_acquired``, ``slot_released``, ``waiting_for_training``
    (another job of this process trains), ``stage`` (data: name, seconds), ``resumed``
    (data: step), ``checkpoint`` (data: step, uri).
    """

    kind: str
    job_id: str
    at: float  # time.time()
    data: dict[str, Any] = field(default_factory=dict)


def run_job(
    request: JobRequest,
    config: ServiceConfig,
    *,
    base: BaseInfo | None = None,
    clock: Clock = time.monotonic,
    on_event: Callable[[JobEvent], None] | None = None,
) -> JobResult:
    """Run the job ``request`` describes (see the module docstring); its result, or JobError.

    ``base`` skips resolving ``config.base_source``; ``clock`` is what the deadline is measured
    with (seconds, monotonic).
    """
    job = _Job(request, config, clock, on_event)
    try:
        with _unwound_if_ended():
            return job.run(base)
    except JobError:
        raise
    except Exception as exc:  # a bug or an unforeseen failure: still a failed job, never lost
        log.exception("job %s failed unexpectedly", request.job_id)
        raise JobError(
            f"job {request.job_id}: internal error ({type(exc).__name__}: {exc})"
        ) from exc


# SIGTERM (kill, timeout, systemd, docker stop) and SIGHUP end a process at once by default,
# skipping every `finally`: the job's scratch folder, the user's photos and working images,
# would stay on the disk until the next job. While a job runs in the main thread they unwind it
# first (scratch removed, slot and locks given back), then end the process as they would have.
# (SIGKILL cannot be caught: the next job on the instance removes that run's folder.)
_ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Ended(BaseException):
    """A job ended by a signal; not an Exception, so no handler on the way out catches it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _end(signum: int, frame: Any) -> None:
    for sig in _ENDING_SIGNALS:  # once: a second signal must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    raise _Ended(signum)


@contextlib.contextmanager
def _unwound_if_ended() -> Iterator[None]:
    """See _ENDING_SIGNALS. Only in the main thread (where Python runs signal handlers), and
    only for a signal whose action is still the default: a handler someone set is theirs."""
    ours = []
    if threading.current_thread() is threading.main_thread():
        ours = [s for s in _ENDING_SIGNALS if signal.getsignal(s) == signal.SIG_DFL]
        for sig in ours:
            signal.signal(sig, _end)
    try:
        yield
    except _Ended as ended:
        for sig in ours:
            signal.signal(sig, signal.SIG_DFL)
        log.warning("job ended by %s; its local files are removed", ended)
        signal.raise_signal(ended.signum)  # the default action: the process ends here
        raise
    finally:
        for sig in ours:
            signal.signal(sig, signal.SIG_DFL)


def resolve_service_base(config: ServiceConfig) -> BaseInfo:
    """The base the service trains on: the one the MME serves (same source, same hash)."""
    from ..base.config import TINY, BaseConfig, resolve_base
    from ..base.identity import BaseError, read_base_info
    from ..safe_tar import UnsafeArchiveError
    from ..serving.shared_files import SharedFilesError, ensure_base

    source = config.base_source
    try:
        if source == TINY:
            return resolve_base(BaseConfig())
        if "://" not in source and Path(source).expanduser().is_dir():
            return read_base_info(Path(source).expanduser())
        return ensure_base(source, config.shared_path())
    except (BaseError, SharedFilesError, storage.StorageError, UnsafeArchiveError, OSError) as exc:
        raise JobError(f"the service's base {source!r} is not usable: {exc}") from exc


class _Job:
    def __init__(
        self,
        request: JobRequest,
        config: ServiceConfig,
        clock: Clock,
        on_event: Callable[[JobEvent], None] | None,
    ) -> None:
        self.request, self.config, self.clock, self.on_event = request, config, clock, on_event
        self.started = clock()
        # training stops here, keeping finish_reserve_s to save, package and upload
        self.stop_at = self.started + config.deadline_s - config.finish_reserve_s
        self.work_root = config.work_path()
        self.seconds: dict[str, float] = {}
        self.progress = ProgressReport(request)  # progress.json beside the job's records

    # ------------------------------------------------------------ around the work

    def emit(self, kind: str, **data: Any) -> None:
        if self.on_event is not None:
            self.on_event(JobEvent(kind, self.request.job_id, time.time(), data))

    def left(self) -> float:
        return max(0.0, self.stop_at - self.clock())

    def run(self, base: BaseInfo | None) -> JobResult:
        earlier = self.earlier_result()
        if earlier is not None:
            return earlier
        job_id = self.request.job_id
        waiting_for = "another run of the same job id on this instance"
        try:
            with job_lock(
                self.config.slots_path(),
                job_id,
                timeout_s=self.left(),
                on_wait=lambda: self.emit("waiting_for_job"),
            ):
                earlier = self.earlier_result()  # the run we waited for may have finished it
                if earlier is not None:
                    return earlier
                instance = instance_id(self.config.slots_path())
                lease_s = self.config.deadline_s + LEASE_GRACE_S
                with claimed(self.request, instance, lease_s):
                    earlier = self.earlier_result()  # finished on another instance meanwhile
                    if earlier is not None:
                        return earlier
                    self.remove_leftovers()
                    waiting_for = "a training slot"
                    with training_slot(
                        self.config.slots_path(),
                        self.config.max_concurrent_jobs,
                        owner=f"job {job_id}",
                        timeout_s=self.left(),
                        on_wait=lambda: self.emit("waiting_for_slot"),
                    ) as slot:
                        self.emit("slot_acquired", slot=slot.index, waited_s=slot.waited_s)
                        try:
                            return self.in_scratch(base)
                        finally:
                            self.emit("slot_released", slot=slot.index)
        except SlotTimeout:
            raise JobTimeoutError(
                f"job {job_id} reached its deadline ({self.config.deadline_s:.0f} s) while "
                f"waiting for {waiting_for}; nothing was trained: re-submit the same job id"
            ) from None

    def earlier_result(self) -> JobResult | None:
        self.work_root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".read-{self.request.job_id}-", dir=self.work_root))
        try:
            result = JobStore(self.request, scratch).read_result()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if result is None:
            return None
        if result.user != self.request.user:
            raise JobError(
                f"job_id: {self.request.job_id!r} already produced the model of user "
                f"{result.user!r}; use a new job id for user {self.request.user!r}",
                status=409,
            )
        claim = read_claim(self.request)  # None: a result from before claims were written
        if claim is not None:
            check_same_request(claim, self.request)  # not another request's model
        log.info("job %s already succeeded; returning its result", self.request.job_id)
        self.emit("reused")
        return result

    def remove_leftovers(self) -> None:
        """Scratch folders of runs that were killed (SIGKILL, a crashed worker): those of this
        job id (we hold its lock) and those of any job whose lock nobody holds any more."""
        slots = self.config.slots_path()
        for old in self.work_root.iterdir():
            job_id = old.name.split(".", 1)[0]
            if old.name.startswith(".") or "." not in old.name:
                continue  # lock-free reads (.read-*) clean up after themselves
            if job_id == self.request.job_id or not job_is_running(slots, job_id):
                log.info("removing %s, left by a killed run of job %s", old, job_id)
                shutil.rmtree(old, ignore_errors=True)

    def in_scratch(self, base: BaseInfo | None) -> JobResult:
        scratch = Path(tempfile.mkdtemp(prefix=f"{self.request.job_id}.", dir=self.work_root))
        try:
            return self.work(scratch, base)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def timed(self, stage: str, started: float) -> None:
        self.seconds[stage] = round(self.clock() - started, 3)
        log.info("job %s: %s took %.1f s", self.request.job_id, stage, self.seconds[stage])
        self.emit("stage", name=stage, seconds=self.seconds[stage])

    # ------------------------------------------------------------ the work

    def work(self, scratch: Path, base: BaseInfo | None) -> JobResult:
        from ..adapter import WEIGHTS_FILE
        from ..serving.package import package_user, upload_package

        request, store = self.request, JobStore(self.request, scratch / "store")
        t = self.clock()
        self.progress.stage("fetch")
        base = base or resolve_service_base(self.config)
        photos = self.fetch_photos(scratch / "photos")
        self.timed("fetch", t)

        t = self.clock()
        self.progress.stage("preprocess")
        manifest = self.preprocess(photos, scratch / "dataset")
        self.timed("preprocess", t)

        t = self.clock()
        self.progress.stage("train")
        trained = self.train(manifest, scratch / "train", base, store)
        self.timed("train", t)

        t = self.clock()
        self.progress.stage("package")
        try:
            tarball = package_user(
                request.user, trained.adapter_dir, scratch / "package", base=base
            )
        except Exception as exc:
            raise JobError(f"job {request.job_id}: packaging failed: {exc}") from exc
        self.timed("package", t)

        t = self.clock()
        self.progress.stage("upload")
        try:
            upload_package(tarball, request.model_uri)  # one PUT, its sha256 in it
        except storage.StorageError as exc:
            raise JobError(f"job {request.job_id}: {exc}") from exc
        self.timed("upload", t)
        self.seconds["total"] = round(self.clock() - self.started, 3)

        result = JobResult(
            job_id=request.job_id,
            user=request.user,
            target_model=request.target_model,
            model_uri=request.model_uri,
            tarball_bytes=tarball.stat().st_size,
            tarball_sha256=sha256_file(tarball),
            adapter_bytes=(trained.adapter_dir / WEIGHTS_FILE).stat().st_size,
            steps=trained.steps,
            resumed_from=trained.resumed_from,
            seconds=dict(self.seconds),
            photos={
                "kept": manifest.kept_sources,
                "rejected": [{"source": i.source, "reason": i.reason} for i in manifest.rejected],
            },
            base={"base_id": base.base_id, "content_hash": base.content_hash},
            avatarforge_version=__version__,
        )
        try:
            store.write_result(result)
        except storage.StorageError as exc:
            raise JobError(
                f"job {request.job_id}: the model is at {request.model_uri}, but its result "
                f"could not be stored: {exc}"
            ) from exc
        try:
            store.delete_checkpoint()
        except storage.StorageError as exc:  # the job is done; a stale checkpoint is only litter
            log.warning("job %s: checkpoint not deleted: %s", request.job_id, exc)
        return result

    def fetch_photos(self, dest: Path) -> Path:
        """The photos in ``dest``, after their listing passed the service's limits."""
        config, photos = self.config, self.request.photos
        limits = (
            f"service limits: max_photos {config.max_photos}, max_photo_bytes "
            f"{config.max_photo_bytes}, max_total_photo_bytes {config.max_total_photo_bytes}"
        )
        try:
            if isinstance(photos, str):
                objects = storage.list_prefix(photos, limit=config.max_photos + 1)
                if not objects:
                    raise JobError(f"photos: no objects under {photos}", status=400)
                where = f"photos {photos}"
            else:
                objects = storage.head_objects(list(photos))
                where = "photos"
            storage.check_listing(
                objects,
                where,
                max_objects=config.max_photos,
                max_object_bytes=config.max_photo_bytes,
                max_total_bytes=config.max_total_photo_bytes,
                complete=len(objects) <= config.max_photos,
            )
            storage.fetch_objects(objects, dest)
        except storage.ListingLimitError as exc:
            raise JobError(f"{exc} ({limits})", status=400) from exc
        except storage.ObjectNotFoundError as exc:
            raise JobError(f"photos: {exc}", status=400) from exc
        except storage.StorageError as exc:
            raise JobError(f"photos: {exc}", status=_storage_status(exc)) from exc
        return dest

    def preprocess(self, photos: Path, dataset: Path):
        from ..preprocess import NotEnoughPhotosError, PreprocessError, preprocess_dir

        pconfig = preprocess_config(self.request, self.config)
        try:
            manifest = preprocess_dir(photos, dataset, pconfig)
        except NotEnoughPhotosError as exc:
            manifest = exc.manifest
            if manifest is not None:
                self.progress.preprocessed(manifest, dataset)
            kept = manifest.kept_sources if manifest is not None else []
            rejected = (
                [{"source": i.source, "reason": i.reason} for i in manifest.rejected]
                if manifest is not None
                else []
            )
            why = "; ".join(f"{r['source']}: {r['reason']}" for r in rejected) or "none"
            raise JobError(
                f"photos: only {len(kept)} usable photo(s), need at least {pconfig.min_images} "
                f"(preprocess.min_images); rejected: {why}",
                status=400,
                details={"kept": kept, "rejected": rejected},
            ) from exc
        except PreprocessError as exc:
            raise JobError(f"job {self.request.job_id}: preprocessing failed: {exc}") from exc
        self.progress.preprocessed(manifest, dataset)
        return manifest

    def train(self, manifest, out: Path, base: BaseInfo, store: JobStore):
        from ..train import TrainingError, TrainingStopped, train
        from ..train.loop import CHECKPOINT_DIR

        request = self.request
        tconfig = train_config(request, self.config, base=base.base_id, resume=True)
        # What decides the weights: a checkpoint of anything else is not resumed.
        fingerprint = {
            "train": tconfig.result_fields(),
            "dataset_hash": manifest.content_hash,
            "base_hash": base.content_hash,
        }
        resumed = store.fetch_checkpoint(out / CHECKPOINT_DIR, fingerprint) or 0
        if resumed:
            log.info("job %s: resuming from step %d", request.job_id, resumed)
            self.emit("resumed", step=resumed)
        if self.clock() >= self.stop_at:
            raise self.timeout(resumed, tconfig.steps, "before training started")

        def on_checkpoint(path: Path) -> None:
            uri = store.upload_checkpoint(path, fingerprint)
            self.emit("checkpoint", step=int(path.name.rsplit("-", 1)[-1]), uri=uri)

        if not _TRAINING.acquire(blocking=False):
            log.info("job %s: another job of this process is training; waiting", request.job_id)
            self.emit("waiting_for_training")
            if not _TRAINING.acquire(timeout=self.left()):
                raise self.timeout(resumed, tconfig.steps, "waiting for this process's trainer")
        try:
            return train(
                manifest.dir,
                out,
                tconfig,
                base,
                should_stop=lambda: self.clock() >= self.stop_at,
                on_checkpoint=on_checkpoint,
                on_step=self.progress.step,
            )
        except TrainingStopped as exc:
            raise self.timeout(exc.step, exc.total, "") from exc
        except TrainingError as exc:
            raise JobError(f"job {request.job_id}: training failed: {exc}") from exc
        finally:
            _TRAINING.release()

    def timeout(self, step: int, total: int, when: str) -> JobTimeoutError:
        config, request = self.config, self.request
        budget = (
            f"its deadline ({config.deadline_s:.0f} s, of which {config.finish_reserve_s:.0f} s "
            "are kept to save and upload)"
        )
        if step:
            saved = (
                f"saved step {step} of {total} to {request.checkpoint_uri}; re-submit the same "
                f"job id to resume from step {step}"
            )
        else:
            saved = "no step was trained; re-submit the same job id to try again"
        where = f" {when}" if when else f" after step {step} of {total}"
        return JobTimeoutError(
            f"job {request.job_id} stopped at {budget}{where}: {saved}",
            step=step,
            total=total,
            checkpoint_uri=request.checkpoint_uri if step else "",
        )


def _storage_status(exc: storage.StorageError) -> int:
    """400 when S3 says the caller named something missing or forbidden, else 500."""
    cause = exc.__cause__
    code = ""
    if cause is not None and hasattr(cause, "response"):
        code = str(cause.response.get("Error", {}).get("Code", ""))
    client = {"NoSuchBucket", "NoSuchKey", "404", "403", "AccessDenied", "InvalidBucketName"}
    return 400 if code in client else 500
