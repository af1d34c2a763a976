"""What the HTTP routes do, as plain methods over a deployment: photos, trainings, predictions,
forgetting. Every method takes the caller's namespace and the client's names; stored names are
made and checked here (:mod:`.tenancy`). Library functions do the work: the cloud client
(submit, status, generate), the training request's parser, preprocess intake, style packs,
forget.

Where the API keeps its own records, under the deployment's prefix::

    photos/<user>/api/<name>-<sha8>.<ext>   a user's uploaded photos (what a training reads)
    jobs/<training>/api.json                who started it (namespace, client's user, preset,
                                            webhook URL, a hash of the request); written once,
                                            If-None-Match: an Idempotency-Key's lock
    api/webhooks/<training>.json            a webhook waiting to be sent (:mod:`.webhooks`)
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import storage
from ..cloud.client import (
    FAILED,
    PENDING,
    SUCCEEDED,
    CloudError,
    EndpointError,
    RetryPolicy,
    UnknownJobError,
    job_uri,
    status,
    submit,
)
from ..cloud.photos import PhotoLimits
from ..deploy.config import DeployConfig
from ..errors import AvatarforgeError
from ..jobs.progress import PROGRESS_FILE, SHEET_FILE, STAGES
from ..settings import ConfigError
from .config import ApiConfig
from .tenancy import internal_user, new_training_id, owns

RECORD = "api.json"
PHOTOS_FOLDER = "api"  # photos/<user>/api/
# the share of a training's time each stage takes, roughly (for one progress fraction)
_WEIGHTS = {"fetch": 0.02, "preprocess": 0.08, "train": 0.85, "package": 0.03, "upload": 0.02}
_STEM = re.compile(r"[^A-Za-z0-9_-]+")
_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "HEIF": "heic"}
SUBMITTING_S = 120  # a record younger than this, without a submission, is being submitted


class ApiError(AvatarforgeError):
    """A request the API refuses; ``status`` as given (``retry_after`` for a 503 or 429)."""

    def __init__(self, message: str, status: int, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass
class ApiService:
    deployment: DeployConfig
    config: ApiConfig
    photo_limits: PhotoLimits = field(default_factory=PhotoLimits)
    preprocess: Any = None  # a PreprocessConfig: intake's limits (default: its defaults)
    invoke_timeout_s: float = 70.0  # read timeout of one InvokeEndpoint (a CPU stack: more)
    mme_sagemaker_url: str | None = None  # a local MME to unload forgotten users from
    endpoint: str | None = None  # the MME endpoint's name, when not the deployment's
    session: Any = None  # boto3 session (default: the environment's)

    def __post_init__(self) -> None:
        if self.preprocess is None:
            from ..preprocess import PreprocessConfig

            self.preprocess = PreprocessConfig()

    # ------------------------------------------------------------------ photos

    def photos_uri(self, stored_user: str) -> str:
        return self.deployment.s3("photos", stored_user, PHOTOS_FOLDER) + "/"

    def list_photos(self, namespace: str, user: str) -> dict[str, Any]:
        stored = internal_user(namespace, user)
        found = storage.list_prefix(self.photos_uri(stored), limit=self.photo_limits.max_photos + 1)
        return {
            "user": user,
            "photos": [{"name": o.name, "bytes": o.size} for o in found],
            "limits": dataclasses.asdict(self.photo_limits),
        }

    def add_photos(self, namespace: str, user: str, files: list[tuple[str, bytes]]) -> dict:
        """Check each photo as preprocess's intake does (format, size, pixels, decodable) and
        the user's photos against the training service's limits, then store the usable ones.
        A photo that fails is named with its reason; nothing is stored when none passes or a
        limit breaks."""
        from ..preprocess.intake import Rejected, load_photo

        stored_user = internal_user(namespace, user)
        limits, pconfig = self.photo_limits, self.preprocess
        if not files:
            raise ApiError("photos: no files in the upload (multipart field 'photos')", 400)
        kept: list[tuple[str, bytes]] = []
        rejected = []
        with tempfile.TemporaryDirectory(prefix="avatarforge-api-") as tmp:
            for i, (filename, data) in enumerate(files):
                shown = filename or f"photo {i + 1}"
                if len(data) > limits.max_photo_bytes:
                    rejected.append(
                        {
                            "file": shown,
                            "reason": f"{len(data) / 2**20:.1f} MiB, more than "
                            f"{limits.max_photo_bytes / 2**20:.0f} MiB per photo",
                        }
                    )
                    continue
                path = Path(tmp) / f"{i}"
                path.write_bytes(data)
                try:
                    photo = load_photo(
                        path,
                        min_side=pconfig.min_side,
                        max_pixels=pconfig.max_pixels,
                        work_side=pconfig.work_side,
                    )
                except Rejected as exc:
                    rejected.append({"file": shown, "reason": str(exc)})
                    continue
                finally:
                    path.unlink(missing_ok=True)
                kept.append((_photo_name(filename, data, photo.format), data))
        if not kept:
            raise ApiError(
                "photos: none is usable: "
                + "; ".join(f"{r['file']}: {r['reason']}" for r in rejected),
                400,
            )
        prefix = self.photos_uri(stored_user)
        existing = storage.list_prefix(prefix, limit=limits.max_photos + 1)
        names = {o.name for o in existing}
        new = [(n, d) for n, d in dict(kept).items() if n not in names]
        planned = existing + [storage.ObjectInfo(prefix + n, len(d)) for n, d in new]
        storage.check_listing(
            planned,
            f"user {user}'s photos",
            max_objects=limits.max_photos,
            max_object_bytes=limits.max_photo_bytes,
            max_total_bytes=limits.max_total_bytes,
            complete=len(existing) <= limits.max_photos,
        )
        for name, data in new:
            storage.write_bytes(prefix + name, data)
        return {
            "user": user,
            "stored": [n for n, _ in kept],
            "rejected": rejected,
            "photos": len(planned),
        }

    # ------------------------------------------------------------------ trainings

    def start_training(
        self,
        namespace: str,
        key_name: str,
        user: str,
        preset: str,
        webhook_url: str | None,
        idempotency_key: str | None,
    ) -> tuple[dict[str, Any], bool]:
        """Submit a training of the user's uploaded photos; (its view, replayed?)."""
        from ..jobs.config import ServiceConfig
        from ..jobs.errors import JobRequestError
        from ..jobs.request import parse_request
        from .webhooks import check_url

        stored_user = internal_user(namespace, user)
        if preset not in self.config.presets:
            raise ApiError(
                f"preset: unknown preset {preset!r} (known: {', '.join(self.config.presets)})", 400
            )
        if webhook_url is not None:
            self.webhook_secret()  # a webhook cannot be promised without a secret to sign it
            check_url(webhook_url, allow_private=self.config.webhook_allow_private)
        asked = {"user": user, "preset": preset, "webhook_url": webhook_url}
        digest = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()
        job_id = new_training_id(namespace, idempotency_key)
        photos = self.photos_uri(stored_user)
        overrides = {"train": dict(self.config.presets[preset])}
        request = {
            "job_id": job_id,
            "user": stored_user,
            "photos": photos,
            "models_prefix": self.deployment.models_prefix,
            "work_prefix": self.deployment.jobs_prefix,
            **overrides,
        }
        service = ServiceConfig(s3_prefix=self.deployment.s3(""))
        try:  # the training service's own check: the same errors, before anything is written
            parse_request(request, service)
        except JobRequestError as exc:
            raise ApiError(str(exc), exc.status) from None
        if not storage.list_prefix(photos, limit=1):
            raise ApiError(f"user {user} has no photos: POST /v1/users/{user}/photos first", 400)
        record = {
            "job_id": job_id,
            "namespace": namespace,
            "user": stored_user,
            "client_user": user,
            "key": key_name,
            "preset": preset,
            "webhook_url": webhook_url,
            "request_sha256": digest,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        record_uri = job_uri(self.deployment, job_id, RECORD)
        try:
            storage.write_bytes(record_uri, json.dumps(record).encode(), if_none_match=True)
        except storage.PreconditionFailedError:
            return self._replay(namespace, job_id, digest), True
        self._submit(record, photos, overrides)
        return self.training(namespace, job_id), False

    def _submit(self, record: dict[str, Any], photos: str, overrides: dict) -> None:
        from .webhooks import Outbox

        submit(
            self.deployment,
            record["user"],
            photos,
            job_id=record["job_id"],
            overrides=overrides,
            session=self.session,
        )
        if record["webhook_url"]:
            Outbox(self.webhooks_prefix(), b"", lambda _: None, **self._outbox_args()).add(
                record["job_id"], record["webhook_url"]
            )

    def _replay(self, namespace: str, job_id: str, digest: str) -> dict[str, Any]:
        record = self._record(namespace, job_id)
        if record.get("request_sha256") != digest:
            raise ApiError(
                "Idempotency-Key: already used for another training request (another user, "
                "preset or webhook URL); use a new key",
                409,
            )
        try:
            storage.head_objects([job_uri(self.deployment, job_id, "submission.json")])
        except storage.ObjectNotFoundError:
            age = time.time() - _timestamp(record.get("created_at"))
            if age < SUBMITTING_S:
                raise ApiError(
                    "Idempotency-Key: this training is being submitted; retry", 409, retry_after=5
                ) from None
            overrides = {"train": dict(self.config.presets.get(record["preset"], {}))}
            self._submit(record, self.photos_uri(record["user"]), overrides)
        return self.training(namespace, job_id)

    def _record(self, namespace: str, job_id: str) -> dict[str, Any]:
        """The API record of a training of ``namespace``; 404 for any other."""
        missing = ApiError(f"no training {job_id!r}", 404)
        if not isinstance(job_id, str) or not owns(namespace, job_id):
            raise missing
        try:
            data, _ = storage.read_bytes(job_uri(self.deployment, job_id, RECORD))
            record = json.loads(data)
        except (storage.ObjectNotFoundError, ValueError):
            raise missing from None
        if not isinstance(record, dict) or record.get("namespace") != namespace:
            raise missing
        return record

    def training(self, namespace: str, job_id: str) -> dict[str, Any]:
        """The training as a client sees it: state, progress, photos, failure."""
        from ..names import InvalidNameError, check_job_id

        try:
            check_job_id(job_id, field="training id")
        except InvalidNameError:
            raise ApiError(f"no training {job_id!r}", 404) from None
        record = self._record(namespace, job_id)
        try:
            found = status(self.deployment, job_id, session=self.session)
        except UnknownJobError:
            found = None  # recorded, not submitted (yet)
        return self._view(record, found)

    def _view(self, record: dict[str, Any], found: Any) -> dict[str, Any]:
        job_id, user = record["job_id"], record["client_user"]
        progress = self._progress(job_id)
        state = found.state if found is not None else PENDING
        if state == PENDING:
            state = "running" if progress and progress.get("stage") in STAGES else "queued"
        stage = (progress or {}).get("stage") or "queued"
        step, total = (progress or {}).get("step", 0), (progress or {}).get("total", 0)
        view: dict[str, Any] = {
            "id": job_id,
            "user": user,
            "preset": record.get("preset"),
            "state": state,
            "created_at": record.get("created_at"),
            "webhook_url": record.get("webhook_url"),
            "progress": {
                "stage": "done" if state == SUCCEEDED else stage,
                "step": step,
                "total": total,
                "fraction": 1.0 if state == SUCCEEDED else _fraction(stage, step, total),
            },
            "photos": (progress or {}).get("photos"),
            "contact_sheet": (
                f"/v1/trainings/{job_id}/contact_sheet.png"
                if (progress or {}).get("contact_sheet")
                else None
            ),
            "failure": None,
        }
        if state == FAILED:
            failure = found.failure or {}
            code = failure.get("code")
            fault = failure.get("client_fault")
            if not isinstance(fault, bool):
                fault = isinstance(code, int) and 400 <= code < 500
            reason = str(found.reason or "failed").replace(record["user"], user)
            view["failure"] = {
                "reason": reason,
                "client_fault": fault,
                "code": code if isinstance(code, int) else None,
            }
            details = failure.get("details")
            if view["photos"] is None and isinstance(details, dict) and "rejected" in details:
                view["photos"] = {"kept": details.get("kept"), "rejected": details["rejected"]}
        if state == SUCCEEDED:
            result = found.result or {}
            view["result"] = {"steps": result.get("steps"), "seconds": result.get("seconds")}
            if view["photos"] is None and isinstance(result.get("photos"), dict):
                view["photos"] = result["photos"]
        return view

    def _progress(self, job_id: str) -> dict[str, Any] | None:
        try:
            data, _ = storage.read_bytes(job_uri(self.deployment, job_id, PROGRESS_FILE))
            progress = json.loads(data)
        except (storage.ObjectNotFoundError, ValueError):
            return None
        return progress if isinstance(progress, dict) else None

    def contact_sheet(self, namespace: str, job_id: str) -> bytes:
        self._record(namespace, job_id)
        try:
            data, _ = storage.read_bytes(
                job_uri(self.deployment, job_id, SHEET_FILE), max_bytes=16 * 2**20
            )
        except storage.ObjectNotFoundError:
            raise ApiError(f"training {job_id}: no contact sheet yet", 404) from None
        return data

    def event(self, job_id: str) -> dict[str, Any] | None:
        """The webhook event of a training that ended; None while it runs."""
        try:
            data, _ = storage.read_bytes(job_uri(self.deployment, job_id, RECORD))
            record = json.loads(data)
        except storage.ObjectNotFoundError:
            return {"gone": True}
        try:
            found = status(self.deployment, job_id, session=self.session)
        except UnknownJobError:
            return None
        if not found.done:
            return None
        view = self._view(record, found)
        return {
            "id": f"evt_{job_id}_{found.state}",
            "type": f"training.{found.state}",
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "data": view,
        }

    # ------------------------------------------------------------------ webhooks

    def webhook_secret(self) -> bytes:
        try:
            return self.config.webhook_secret()
        except ConfigError as exc:
            raise ApiError(f"webhooks are not available on this API: {exc}", 503) from None

    def webhooks_prefix(self) -> str:
        return self.deployment.s3("api", "webhooks") + "/"

    def _outbox_args(self) -> dict[str, Any]:
        c = self.config
        return {
            "attempts": c.webhook_attempts,
            "backoff_s": c.webhook_backoff_s,
            "backoff_max_s": c.webhook_backoff_max_s,
            "timeout_s": c.webhook_timeout_s,
            "allow_private": c.webhook_allow_private,
        }

    def outbox(self, **extra: Any):
        from .webhooks import Outbox

        return Outbox(
            self.webhooks_prefix(),
            self.webhook_secret(),
            self.event,
            **{**self._outbox_args(), **extra},
        )

    # ------------------------------------------------------------------ predictions

    def predict(
        self,
        namespace: str,
        user: str,
        prompt: str | None,
        negative_prompt: str | None,
        pack: str | None,
        gen_args: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Images of the user's model: one prompt, or every avatar of a style pack."""
        from ..cloud.client import NoModelError
        from ..cloud.client import generate as cloud_generate
        from ..generate import GenArgs

        stored_user = internal_user(namespace, user)
        if (prompt is None) == (pack is None):
            raise ApiError("give prompt or pack, one of them", 400)
        limit = self.config.max_prompt_chars
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if text is not None and len(text) > limit:
                raise ApiError(f"{name}: {len(text)} characters, more than {limit}", 400)
        if pack is not None:
            from ..packs import UnknownPackError, load_pack

            try:
                chosen = load_pack(pack)
            except UnknownPackError as exc:  # a field of the body, not a resource of the path
                raise ApiError(f"pack: {exc}", 400) from None
            items = [
                (i.prompt, i.negative_prompt or None, i.gen_args, _labels(i))
                for i in chosen.items(override=gen_args)
            ]
        else:
            args = GenArgs.parse(gen_args).to_dict() if gen_args is not None else None
            items = [(prompt, negative_prompt, args, {})]
        retry = RetryPolicy(
            model_loading_s=self.config.predict_wait_s, read_timeout_s=self.invoke_timeout_s
        )
        out = []
        for text, negative, args, labels in items:
            try:
                jpegs = cloud_generate(
                    self.endpoint or self.deployment, stored_user, text, negative, args,
                    region=self.deployment.region, models_prefix=self.deployment.models_prefix,
                    retry=retry, session=self.session,
                )  # fmt: skip
            except NoModelError:
                raise ApiError(
                    f"user {user} has no model yet: start a training (POST /v1/trainings) and "
                    "wait until it succeeds",
                    404,
                ) from None
            except EndpointError as exc:
                if _loading(exc):
                    raise ApiError(
                        f"user {user}'s model is loading; retry", 503,
                        retry_after=self.config.retry_after_s,
                    ) from None  # fmt: skip
                raise ApiError(str(exc).replace(stored_user, user), exc.status) from None
            except CloudError as exc:
                raise ApiError(str(exc).replace(stored_user, user), exc.status) from None
            out.append(
                {
                    **labels,
                    "prompt": text,
                    "negative_prompt": negative,
                    "gen_args": args,
                    "images": [base64.b64encode(j).decode() for j in jpegs],
                }
            )
        return {"user": user, "pack": pack, "avatars": out}

    # ------------------------------------------------------------------ forget

    def forget(self, namespace: str, user: str) -> dict[str, Any]:
        """``avatarforge forget`` of the user on the deployment (and the local MME)."""
        from ..forget import forget

        stored_user = internal_user(namespace, user)
        report = forget(
            stored_user,
            local=False,
            deployment=self.deployment,
            mme_sagemaker_url=self.mme_sagemaker_url,
            session=self.session,
        ).to_dict()
        text = json.dumps(report).replace(stored_user, user)
        return json.loads(text)


def _loading(exc: EndpointError) -> bool:
    """The model is loading or the endpoint asks for a retry (what the client retried)."""
    return exc.code in ("ModelNotReadyException", "ServiceUnavailable", "ThrottlingException") or (
        exc.code == "ModelError" and "unavailable:" in str(exc)
    )


def _labels(item: Any) -> dict[str, str]:
    return {"style": item.style, "framing": item.framing}


def _fraction(stage: str, step: int, total: int) -> float:
    if stage not in _WEIGHTS:
        return 0.0
    done = sum(_WEIGHTS[s] for s in STAGES[: STAGES.index(stage)])
    if stage == "train" and total:
        done += _WEIGHTS["train"] * min(1.0, step / total)
    return round(done, 3)


def _photo_name(filename: str, data: bytes, fmt: str) -> str:
    stem = _STEM.sub("-", Path(filename or "photo").stem).strip("-_")[:40] or "photo"
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.{_EXT.get(fmt, 'jpg')}"


def _timestamp(text: Any) -> float:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return 0.0
