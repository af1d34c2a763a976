"""A user's objects in a deployment's bucket (:class:`~avatarforge.deploy.config.DeployConfig`).

Under ``s3://<bucket>/<prefix>``::

    photos/<user>/                 the client's uploads: the exact prefix, '/' included
    models/<user>.tar.gz[.sha256]  the TargetModel and its digest file: exact keys
    jobs/<job>/                    each job of the user: request, submission, claim, checkpoint,
                                   result. A job is the user's when its first record (in that
                                   order) names them; a job folder with no record is left alone.
    async/out/, async/failed/      the async endpoint's output or failure document of each of
                                   those jobs: the exact keys its submission recorded

Nothing is matched by a bare string prefix: ``photos/al`` would also list ``photos/alice/``.
On a versioned bucket (versioning Enabled or Suspended) every version and delete marker of
those keys is deleted: a plain delete only adds a delete marker, and the photos would stay
readable as the version before it.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..deploy.config import DeployConfig
from ..names import check_user_id
from ..serving.package_check import CHECKSUM_SUFFIX
from ..storage import parse_s3_uri
from .report import DELETED, FAILED, Report

WHERE = "s3"
# The documents that name a job's user, in the order they are read (the first found decides):
# the client's request and submission, the service's result, the service's claim, the HTTP
# API's record (written first: alone when a submission failed).
RECORDS = ("request.json", "submission.json", "result.json", "claim.json", "api.json")
READERS = 16  # job records read at once (boto3 clients are thread-safe)


@dataclass(frozen=True)
class _Object:
    key: str
    version: str | None  # None: the bucket is not versioned
    size: int
    modified: float = 0.0
    marker: bool = False  # a delete marker


class _Bucket:
    def __init__(self, s3: Any, name: str) -> None:
        self.s3, self.name = s3, name
        status = s3.get_bucket_versioning(Bucket=name).get("Status")
        self.versioned = status in ("Enabled", "Suspended")  # Suspended keeps older versions

    def list(self, prefix: str) -> list[_Object]:
        if not self.versioned:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=prefix
            )
            return [
                _Object(o["Key"], None, int(o["Size"]), o["LastModified"].timestamp())
                for page in pages
                for o in page.get("Contents", [])
            ]
        found = []
        pages = self.s3.get_paginator("list_object_versions").paginate(
            Bucket=self.name, Prefix=prefix
        )
        for page in pages:
            for v in page.get("Versions", []):
                found.append(
                    _Object(v["Key"], v["VersionId"], int(v["Size"]), v["LastModified"].timestamp())
                )
            for m in page.get("DeleteMarkers", []):
                modified = m["LastModified"].timestamp()
                found.append(_Object(m["Key"], m["VersionId"], 0, modified, marker=True))
        return found

    def exact(self, key: str) -> list[_Object]:
        return [o for o in self.list(key) if o.key == key]

    def read_json(self, objects: list[_Object], key: str) -> Any:
        """The newest readable version of ``key`` among ``objects``, decoded; None if none."""
        versions = sorted(
            (o for o in objects if o.key == key and not o.marker), key=lambda o: -o.modified
        )
        if not versions:
            return None
        extra = {"VersionId": versions[0].version} if versions[0].version else {}
        body = self.s3.get_object(Bucket=self.name, Key=key, **extra)["Body"].read()
        try:
            return json.loads(body)
        except ValueError:
            return None

    def delete(self, objects: list[_Object]) -> list[str]:
        """Delete every object (each version, each delete marker); the errors S3 named."""
        errors = []
        for start in range(0, len(objects), 1000):  # DeleteObjects takes 1000 at a time
            batch = [
                {"Key": o.key, **({"VersionId": o.version} if o.version else {})}
                for o in objects[start : start + 1000]
            ]
            answer = self.s3.delete_objects(
                Bucket=self.name, Delete={"Objects": batch, "Quiet": True}
            )
            errors += [
                f"{e.get('Key')}: {e.get('Code')} ({e.get('Message')})"
                for e in answer.get("Errors", [])
            ]
        return errors

    def remove(self, report: Report, what: str, uri: str, objects: list[_Object]) -> None:
        if not objects:
            return
        detail = _amount(objects, self.versioned)
        if not report.dry_run and (errors := self.delete(objects)):
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            report.add(WHERE, what, uri, FAILED, "; ".join(errors[:3]) + more)
            return
        report.add(WHERE, what, uri, DELETED, detail)


def _amount(objects: list[_Object], versioned: bool) -> str:
    size = sum(o.size for o in objects)
    amount = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"
    if not versioned:
        return f"{len(objects)} object{'s' if len(objects) != 1 else ''}, {amount}"
    keys = len({o.key for o in objects})
    markers = sum(o.marker for o in objects)
    return (
        f"{keys} key{'s' if keys != 1 else ''}: {len(objects) - markers} version(s), "
        f"{markers} delete marker(s), {amount}"
    )


def _user_of(name: str, doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return None
    if name == "claim.json":  # {"request": {...the job request...}, "holder", "until"}
        doc = doc.get("request")
        if not isinstance(doc, dict):
            return None
    user = doc.get("user")
    return user if isinstance(user, str) else None


def forget_deployment(
    user: str,
    config: DeployConfig,
    report: Report,
    *,
    session: Any = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Delete the user's objects in the deployment's bucket and add each to ``report``."""
    from botocore.exceptions import BotoCoreError, ClientError

    check_user_id(user)
    if session is None:
        import boto3

        session = boto3.session.Session()
    s3 = session.client("s3", region_name=config.region)
    try:
        _forget(user, config, report, _Bucket(s3, config.bucket), clock)
    except (ClientError, BotoCoreError) as exc:
        report.add(WHERE, "deployment", f"s3://{config.bucket}/{config.prefix}", FAILED, str(exc))
    report.note(
        f"SageMaker MME: an instance that has {user}.tar.gz loaded can keep answering for it, "
        "from memory or its disk cache, until it unloads it to make room for other models "
        "(least recently used, only under memory or disk pressure) or the instance is "
        "replaced: there is no API to unload one TargetModel. The instance's life bounds it; "
        "to end it now, replace the endpoint's instances (UpdateEndpoint to a new endpoint "
        "config: a blue/green update). New loads fail at once: the object is gone."
    )
    report.note(
        "not touched: CloudWatch logs of the endpoints (they name the user and job ids, and "
        "the file names of rejected photos; kept as the log group's retention says) and SNS/SQS "
        "notifications (job id and output location; until the queue's retention)"
    )


def _forget(user: str, config: DeployConfig, report: Report, bucket: _Bucket, clock) -> None:
    uri = f"s3://{bucket.name}/"
    photos = config.key("photos", user) + "/"
    bucket.remove(report, "photos", uri + photos, bucket.list(photos))
    model = config.key("models", f"{user}.tar.gz")
    bucket.remove(report, "package", uri + model, bucket.exact(model))
    bucket.remove(report, "package digest", uri + model + CHECKSUM_SUFFIX,
                  bucket.exact(model + CHECKSUM_SUFFIX))  # fmt: skip

    jobs = config.key("jobs") + "/"
    by_job: dict[str, list[_Object]] = defaultdict(list)
    for obj in bucket.list(jobs):
        job_id, slash, _ = obj.key[len(jobs) :].partition("/")
        if slash:
            by_job[job_id].append(obj)

    def owner(job_id: str) -> str | None:
        for name in RECORDS:
            doc = bucket.read_json(by_job[job_id], f"{jobs}{job_id}/{name}")
            if (found := _user_of(name, doc)) is not None:
                return found
        return None

    ids = sorted(by_job)
    with ThreadPoolExecutor(READERS) as pool:  # a GET or more per job: latency, not work
        owners = dict(zip(ids, pool.map(owner, ids), strict=True))
    unattributed = sum(found is None for found in owners.values())
    for job_id in ids:
        if owners[job_id] == user:
            _forget_job(user, config, report, bucket, job_id, by_job[job_id], clock)
    if unattributed:
        report.note(
            f"{unattributed} job folder(s) under {uri}{jobs} name no user (no "
            f"{', '.join(RECORDS)}): left alone; such a folder holds at most a checkpoint"
        )


def _forget_job(user, config, report, bucket: _Bucket, job_id, objects, clock) -> None:
    folder = f"{config.key('jobs')}/{job_id}/"
    submission = bucket.read_json(objects, folder + "submission.json") or {}
    request = bucket.read_json(objects, folder + "request.json") or {}
    claim = bucket.read_json(objects, folder + "claim.json") or {}
    if isinstance(claim, dict) and claim.get("holder"):
        until = claim.get("until")
        if not isinstance(until, int | float) or until > clock():  # unreadable: assume running
            try:
                when = datetime.fromtimestamp(until, UTC).isoformat(timespec="seconds")
            except (TypeError, ValueError, OverflowError, OSError):
                when = repr(until)
            report.pending.append(
                f"job {job_id} is running (its claim is held until {when}): it may write "
                f"models/{user}.tar.gz and its records again; run forget again after it ends"
            )
    # the async endpoint's documents of this job: exact keys, and only the deployment's own
    outputs = []
    own = {"async output": config.key("async", "out") + "/",
           "async failure": config.key("async", "failed") + "/"}  # fmt: skip
    for field in ("output_location", "failure_location"):
        location = submission.get(field) if isinstance(submission, dict) else None
        if isinstance(location, str) and location.startswith("s3://"):
            target = parse_s3_uri(location)
            for what, prefix in own.items():
                if target.bucket == bucket.name and target.key.startswith(prefix):
                    outputs.append((what, target.key))
    own_photos = f"s3://{bucket.name}/{config.key('photos', user)}/"
    for doc in (request, submission, claim.get("request") if isinstance(claim, dict) else None):
        read = doc.get("photos") if isinstance(doc, dict) else None
        sources = [read] if isinstance(read, str) else read if isinstance(read, list) else []
        for source in sources:
            if isinstance(source, str) and not source.startswith(own_photos):
                report.note(
                    f"job {job_id} read photos from {source}, outside the deployment's "
                    f"photos/{user}/: not deleted (delete them where they live)"
                )
    bucket.remove(report, "job records", f"s3://{bucket.name}/{folder}", objects)
    for what, key in outputs:
        bucket.remove(report, what, f"s3://{bucket.name}/{key}", bucket.exact(key))
