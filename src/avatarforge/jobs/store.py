"""A job's folder in S3, ``<work_prefix><job_id>/``: its checkpoint and its result.

- ``checkpoint.tar.gz``: the trainer's newest checkpoint folder plus ``job.json`` (what the
  checkpoint was trained from), replaced atomically at every checkpoint (one PUT or one
  completed multipart upload) and deleted once the job succeeded.
- ``result.json``: written after the tarball upload; its presence means the job is done.
- ``claim.json``: the request the job id names and the run that holds it (:mod:`.claim`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .. import storage
from ..safe_tar import safe_extract, write_reproducible_tar
from .request import JobRequest
from .result import JobResult

log = logging.getLogger(__name__)
JOB_FILE = "job.json"
CHECKPOINT_PREFIX = "step-"  # avatarforge.train.checkpoint.PREFIX
# A checkpoint holds LoRA weights and optimizer state: far below the tar defaults at any rank
# the service allows, but a tampered object must not fill the disk.
MAX_CHECKPOINT_BYTES = 4 * 2**30


class JobStore:
    """Reads and writes one job's objects; ``scratch`` is a local folder for the transfers."""

    def __init__(self, request: JobRequest, scratch: Path) -> None:
        self.request = request
        self.scratch = Path(scratch)

    def _tmpdir(self) -> Path:
        self.scratch.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".store-", dir=self.scratch))

    # ------------------------------------------------------------ result

    def read_result(self) -> JobResult | None:
        """The stored result of this job id, or None when there is none."""
        tmp = self._tmpdir()
        try:
            try:
                path = storage.fetch(self.request.result_uri, tmp / "result.json")
            except storage.ObjectNotFoundError:
                return None
            try:
                return JobResult.from_dict(json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                raise storage.StorageError(
                    f"{self.request.result_uri}: unreadable job result ({exc})"
                ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write_result(self, result: JobResult) -> str:
        tmp = self._tmpdir()
        try:
            path = tmp / "result.json"
            path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
            return storage.upload(path, self.request.result_uri)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------ checkpoint

    def upload_checkpoint(self, checkpoint_dir: Path, fingerprint: dict[str, Any]) -> str:
        """Upload the trainer's checkpoint folder (and ``fingerprint``) as one tarball."""
        tmp = self._tmpdir()
        try:
            stage = tmp / "stage"
            staged = stage / Path(checkpoint_dir).name
            staged.mkdir(parents=True)
            for item in Path(checkpoint_dir).iterdir():
                _link_or_copy(item, staged / item.name)
            (stage / JOB_FILE).write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
            archive = write_reproducible_tar(stage, tmp / "checkpoint.tar.gz", arcname=".")
            return storage.upload(archive, self.request.checkpoint_uri)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def fetch_checkpoint(self, checkpoints_dir: Path, fingerprint: dict[str, Any]) -> int | None:
        """Put the stored checkpoint into ``checkpoints_dir`` (the trainer's checkpoint folder)
        and return its step; None when there is none or it was made from another request or
        service preset (then the job starts over: the trainer would refuse it anyway)."""
        tmp = self._tmpdir()
        try:
            try:
                archive = storage.fetch(self.request.checkpoint_uri, tmp / "checkpoint.tar.gz")
            except storage.ObjectNotFoundError:
                return None
            safe_extract(
                archive,
                tmp / "x",
                max_member_bytes=MAX_CHECKPOINT_BYTES,
                max_total_bytes=MAX_CHECKPOINT_BYTES,
                max_members=64,
            )
            try:
                theirs = json.loads((tmp / "x" / JOB_FILE).read_text())
            except (OSError, ValueError):
                theirs = None
            steps = sorted((tmp / "x").glob(f"{CHECKPOINT_PREFIX}*"))
            if theirs != fingerprint or len(steps) != 1:
                changed = (
                    sorted(k for k in fingerprint if theirs.get(k) != fingerprint[k])
                    if isinstance(theirs, dict)
                    else ["job.json"]
                )
                log.warning(
                    "job %s: the stored checkpoint was made with other %s; starting over",
                    self.request.job_id,
                    ", ".join(changed) or "contents",
                )
                return None
            Path(checkpoints_dir).mkdir(parents=True, exist_ok=True)
            target = Path(checkpoints_dir) / steps[0].name
            os.replace(steps[0], target)
            try:
                return int(json.loads((target / "state.json").read_text())["step"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning(
                    "job %s: unreadable checkpoint (%s); starting over", self.request.job_id, exc
                )
                shutil.rmtree(target, ignore_errors=True)
                return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def delete_checkpoint(self) -> None:
        storage.delete(self.request.checkpoint_uri)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same file system: no copy of a large optimizer state
    except OSError:
        shutil.copyfile(src, dst)
