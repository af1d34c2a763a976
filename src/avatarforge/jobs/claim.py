"""One request per job id, and one run of it at a time on all instances: a claim in S3.

``<work_prefix><job_id>/claim.json`` holds the request the job id was first given, which run
holds it and until when::

    {"request": {...JobRequest.to_dict()...}, "holder": "<instance>/<run>", "until": <epoch s>}

- The first submission creates it with a conditional PUT (``If-None-Match: *``): of two callers
  that race, S3 lets exactly one create it.
- Every later submission reads it first. Another request under the same job id (other photos,
  user, prefixes or overrides) is refused, 409, naming what differs: a job id names one request
  for ever, so its result is never another request's model. The same request while a run on
  another instance holds an unexpired claim is refused, 409, "running on another instance".
  Otherwise (given back, expired, or held by a run of this instance, whose job lock we now hold:
  a run that was killed) it is taken over with a PUT conditional on the ETag just read
  (``If-Match``): of two callers that race, one wins and the other reads again.
- A run gives its claim back (``holder`` empty) when it ends, however it ends. A run killed on
  another instance keeps it until ``until``: its deadline plus a minute.

Both conditions are S3's conditional writes (PutObject ``If-None-Match`` and ``If-Match``), which
moto 5.2.5's server also implements; an instance is the set of worker processes sharing one
slots folder (its ``instance-id`` file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import storage
from .errors import JobError
from .request import JobRequest

log = logging.getLogger(__name__)
CLAIM_FILE = "claim.json"
LEASE_GRACE_S = 60.0  # past the run's own deadline, for clocks that differ a little
_ATTEMPTS = 5  # races lost in a row before giving up (each needs another writer)


def claim_uri(request: JobRequest) -> str:
    return request.job_prefix + CLAIM_FILE


def instance_id(slots_dir: Path) -> str:
    """This instance's id: one per slots folder, shared by its worker processes."""
    path = Path(slots_dir) / "instance-id"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".instance-id.{uuid.uuid4().hex}")
        tmp.write_text(uuid.uuid4().hex[:16] + "\n")
        try:
            os.link(tmp, path)  # created whole, or another process's stays
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def read_claim(request: JobRequest) -> dict[str, Any] | None:
    """The stored claim of the request's job id, or None."""
    try:
        data, _ = storage.read_bytes(claim_uri(request))
    except storage.ObjectNotFoundError:
        return None
    except storage.StorageError as exc:
        raise JobError(f"job {request.job_id}: cannot read its claim: {exc}") from exc
    return _parse(data, request)


def check_same_request(claim: dict[str, Any], request: JobRequest) -> None:
    """409 when the job id was claimed for another request."""
    theirs, ours = claim["request"], request.to_dict()
    if theirs != ours:
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        raise JobError(
            f"job_id: {request.job_id!r} already names another request (its "
            f"{', '.join(differ)} differ); a job id is one request: use a new job id",
            status=409,
        )


@contextlib.contextmanager
def claimed(
    request: JobRequest, instance: str, lease_s: float, *, clock: Callable[[], float] = time.time
) -> Iterator[None]:
    """Hold the job id's claim for the block (see the module docstring); JobError 409 when the
    job id names another request or runs on another instance."""
    uri = claim_uri(request)
    holder = f"{instance}/{uuid.uuid4().hex[:12]}"
    etag = _take(uri, request, instance, _document(request, holder, clock() + lease_s), clock)
    try:
        yield
    finally:
        try:
            storage.write_bytes(uri, _document(request, "", 0.0), if_match=etag)
        except storage.PreconditionFailedError:  # taken over: our lease had expired
            log.warning("job %s: its claim was taken over before this run ended", request.job_id)
        except storage.StorageError as exc:  # it expires by itself
            log.warning("job %s: claim not given back: %s", request.job_id, exc)


def _take(
    uri: str, request: JobRequest, instance: str, mine: bytes, clock: Callable[[], float]
) -> str:
    try:
        for _ in range(_ATTEMPTS):
            try:
                return storage.write_bytes(uri, mine, if_none_match=True)
            except storage.PreconditionFailedError:
                pass  # claimed before: read whose, and for what
            try:
                data, etag = storage.read_bytes(uri)
            except storage.ObjectNotFoundError:
                continue  # removed meanwhile (by hand): create it again
            current = _parse(data, request)
            check_same_request(current, request)
            holder, until = current["holder"], current["until"]
            if holder and until > clock() and holder.split("/", 1)[0] != instance:
                when = datetime.fromtimestamp(until, UTC).isoformat(timespec="seconds")
                raise JobError(
                    f"job {request.job_id} is running on another training instance (its claim "
                    f"holds until {when}); wait for its result, or re-submit after that",
                    status=409,
                )
            try:
                return storage.write_bytes(uri, mine, if_match=etag)
            except storage.PreconditionFailedError:
                continue  # another caller changed it first: read again
    except storage.StorageError as exc:
        raise JobError(f"job {request.job_id}: cannot claim the job id: {exc}") from exc
    raise JobError(
        f"job {request.job_id}: its claim changed {_ATTEMPTS} times while this run tried to "
        "take it; re-submit",
        status=409,
    )


def _document(request: JobRequest, holder: str, until: float) -> bytes:
    body = {"request": request.to_dict(), "holder": holder, "until": round(until, 3)}
    return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()


def _parse(data: bytes, request: JobRequest) -> dict[str, Any]:
    try:
        claim = json.loads(data)
        ok = (
            isinstance(claim, dict)
            and isinstance(claim.get("request"), dict)
            and isinstance(claim.get("holder"), str)
            and isinstance(claim.get("until"), int | float)
        )
    except (ValueError, RecursionError):
        ok = False
    if not ok:
        raise JobError(f"job {request.job_id}: its claim {claim_uri(request)} is unreadable")
    return claim
