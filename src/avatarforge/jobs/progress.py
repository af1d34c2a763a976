"""A running job's progress beside its records, for whoever watches it (the HTTP API, a
person with the bucket open): ``<work_prefix><job_id>/progress.json`` and, once the photos are
preprocessed, ``contact_sheet.png`` (each photo beside its crop, or the reason it was rejected).

::

    {"job_id": "...", "stage": "train", "step": 40, "total": 60,
     "stages": ["fetch", "preprocess", "train", "package", "upload"],
     "photos": {"kept": ["a.jpg", ...], "rejected": [{"source": "b.jpg", "reason": "..."}]},
     "contact_sheet": "contact_sheet.png", "updated_at": 1765000000.0}

Written best effort, in one PUT each: a write that fails is logged and never fails the job.
Training steps are written at most every ``min_interval_s`` (and the last one always), so a
fast CPU run does not PUT per step. The job folder holds the user's data already (request,
checkpoint); ``forget`` removes it whole.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import storage
from .request import JobRequest

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
SHEET_FILE = "contact_sheet.png"
STAGES = ("fetch", "preprocess", "train", "package", "upload")
MAX_SHEET_BYTES = 16 * 2**20  # a sheet of 100 rows is a few MiB; a bigger one is not shown


class ProgressReport:
    """Writes one job's ``progress.json`` (see the module docstring)."""

    def __init__(
        self,
        request: JobRequest,
        *,
        min_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.request = request
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._last_write = -float("inf")
        self.state: dict[str, Any] = {
            "job_id": request.job_id,
            "stage": "queued",
            "step": 0,
            "total": 0,
            "stages": list(STAGES),
            "photos": None,
            "contact_sheet": None,
        }

    @property
    def uri(self) -> str:
        return self.request.job_prefix + PROGRESS_FILE

    def stage(self, name: str) -> None:
        """A stage of :data:`STAGES` starts."""
        with self._lock:
            self.state["stage"] = name
        self._write()

    def step(self, info: Any) -> None:
        """``train``'s ``on_step`` (a StepInfo): written at most every ``min_interval_s``."""
        with self._lock:
            self.state.update(step=int(info.step), total=int(info.total))
            due = self.clock() - self._last_write >= self.min_interval_s
        if due or info.step >= info.total:
            self._write()

    def preprocessed(self, manifest: Any, dataset: Path) -> None:
        """What preprocessing kept and rejected (and why), and its contact sheet."""
        sheet = Path(dataset) / SHEET_FILE
        photos = {
            "kept": list(manifest.kept_sources),
            "rejected": [{"source": i.source, "reason": i.reason} for i in manifest.rejected],
        }
        shown = None
        try:
            if sheet.is_file() and sheet.stat().st_size <= MAX_SHEET_BYTES:
                storage.write_bytes(self.request.job_prefix + SHEET_FILE, sheet.read_bytes())
                shown = SHEET_FILE
        except (storage.StorageError, OSError) as exc:
            log.warning("job %s: contact sheet not stored: %s", self.request.job_id, exc)
        with self._lock:
            self.state.update(photos=photos, contact_sheet=shown)
        self._write()

    def _write(self) -> None:
        with self._lock:
            self.state["updated_at"] = round(time.time(), 3)
            body = json.dumps(self.state, indent=2).encode()
            self._last_write = self.clock()
        try:
            storage.write_bytes(self.uri, body)
        except storage.StorageError as exc:
            log.warning("job %s: progress not stored: %s", self.request.job_id, exc)
