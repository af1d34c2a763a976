"""The HTTP API (FastAPI): the routes, their errors, auth and limits, the web page.

Every ``/v1`` route needs an API key (``Authorization: Bearer <key>``) and counts against the
key's rate limit. Errors are one JSON shape, ``{"error": "...", "client_fault": true}``, with
the status of the error (:class:`avatarforge.errors.AvatarforgeError`: 400 bad input naming the
field, 401, 404, 409, 413, 429 and 503 with Retry-After); a failure of ours is a 500 naming a
reference that the log holds, never a traceback. Anonymous requests reach only the web page,
its two static files, ``/openapi.json`` and ``/healthz``. FastAPI's own ``/docs`` pages are off:
they load scripts from a CDN.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import AvatarforgeError
from .auth import Keyring, RateLimiter
from .config import ApiKey
from .service import ApiError, ApiService

log = logging.getLogger(__name__)

JSON_BODY_BYTES = 64 * 1024  # a JSON request names things; it carries no photos
MULTIPART_OVERHEAD = 1024 * 1024
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


# ------------------------------------------------------------------------------ bodies


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainingIn(Strict):
    user: str = Field(description="the user id (1-63 letters, digits, '_', '-')")
    preset: str = Field("default", description="a training preset of this API's configuration")
    webhook_url: str | None = Field(
        None, description="POSTed the training's end, signed (Avatarforge-Signature)"
    )


class PredictionIn(Strict):
    user: str
    prompt: str | None = Field(None, description="what to draw: 'a photo of <<TOK>> person'")
    negative_prompt: str | None = None
    pack: str | None = Field(None, description="a style pack: every avatar of it (no prompt)")
    gen_args: dict[str, Any] | None = Field(
        None, description="steps, guidance_scale, seed, height, width, num_images, scheduler"
    )


class Problem(BaseModel):
    error: str
    client_fault: bool


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem} for code in (400, 401, 404, 409, 413, 429, 503)
}


# ------------------------------------------------------------------------------ the app


class BodyLimit:
    """Refuse a request body past its route's limit (413) by Content-Length and as it streams,
    before a parser buffers or spools it."""

    def __init__(self, app: Any, upload_bytes: int) -> None:
        self.app, self.upload_bytes = app, upload_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE"):
            return await self.app(scope, receive, send)
        limit = self.upload_bytes if scope["path"].endswith("/photos") else JSON_BODY_BYTES
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = JSONResponse(
            {"error": f"request body over {limit} bytes", "client_fault": True}, status_code=413
        )
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await too_large(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await too_large(scope, receive, send)


class _TooLarge(AvatarforgeError):
    """A request body over the upload limit, found while it streams in."""

    status = 413


def _caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> ApiKey:
    """The key of the request (401 without a known one), counted against its rate limit."""
    key = request.app.state.keyring.identify(authorization)
    request.app.state.limiter.take(key.name)
    return key


Caller = Annotated[ApiKey, Depends(_caller)]


def create_app(service: ApiService, *, watch: bool = True) -> FastAPI:
    """The API over ``service``; ``watch``: deliver webhooks from a background thread (every
    ``poll_s``) while the app runs."""
    keyring = Keyring(service.config)
    limiter = RateLimiter(service.config.rate_per_minute, service.config.burst)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        worker = None
        if watch:
            worker = threading.Thread(
                target=_watch, args=(service, stop), name="api-webhooks", daemon=True
            )
            worker.start()
        try:
            yield
        finally:
            stop.set()
            if worker is not None:
                worker.join(30)

    app = FastAPI(
        title="avatarforge API",
        version=__version__,
        description="Trainings and predictions of personal avatars, webhooks on completion. "
        "Every /v1 route needs 'Authorization: Bearer <key>'.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.keyring, app.state.limiter = keyring, limiter
    limits = service.photo_limits
    app.add_middleware(BodyLimit, upload_bytes=limits.max_total_bytes + MULTIPART_OVERHEAD)

    @app.exception_handler(AvatarforgeError)
    async def _known(_: Request, exc: AvatarforgeError) -> JSONResponse:
        return _problem(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "header"))
        message = f"{where or 'request'}: {first.get('msg', 'invalid')}"
        return JSONResponse({"error": message, "client_fault": True}, status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(exc.detail), "client_fault": exc.status_code < 500},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        reference = secrets.token_hex(4)
        log.error("internal error %s", reference, exc_info=exc)
        return JSONResponse(
            {"error": f"internal error (reference {reference})", "client_fault": False},
            status_code=500,
        )

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    # ---------------------------------------------------------------- the page

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return Response(
            _page_file("index.html"),
            media_type="text/html",
            headers={"Content-Security-Policy": PAGE_CSP},
        )

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in PAGE_FILES:
            raise ApiError(f"no file {name!r}", 404)
        return Response(_page_file(name), media_type=PAGE_FILES[name])

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    # ---------------------------------------------------------------- users and photos

    @app.post("/v1/users/{user}/photos", status_code=201, responses=ERRORS, tags=["users"])
    def add_photos(
        user: str,
        key: Caller,
        photos: Annotated[list[UploadFile], File(description="the selfies, JPEG/PNG/WebP/HEIC")],
    ) -> dict[str, Any]:
        """Upload a user's selfies. Each is checked as preprocessing checks it (format, size,
        pixel count, decodable) and the user's photos against the training service's limits
        before anything is stored; a rejected photo is named with its reason."""
        if len(photos) > limits.max_photos:
            raise ApiError(
                f"photos: {len(photos)} files, more than the limit of {limits.max_photos}", 400
            )
        files = []
        for upload in photos:
            data = upload.file.read(limits.max_photo_bytes + 1)
            files.append((upload.filename or "", data))
        return service.add_photos(key.namespace, user, files)

    @app.get("/v1/users/{user}/photos", responses=ERRORS, tags=["users"])
    def list_photos(user: str, key: Caller) -> dict[str, Any]:
        """The user's stored photos and the limits they must keep."""
        return service.list_photos(key.namespace, user)

    @app.delete("/v1/users/{user}", responses=ERRORS, tags=["users"])
    def forget_user(user: str, key: Caller) -> JSONResponse:
        """Forget the user: what `avatarforge forget USER --config ...` deletes (photos, model,
        job records, async outputs). 200 when complete; 202 when something is not done yet (a
        running training): the report says what, send it again later."""
        report = service.forget(key.namespace, user)
        return JSONResponse(report, status_code=200 if report["complete"] else 202)

    # ---------------------------------------------------------------- trainings

    @app.post("/v1/trainings", status_code=202, responses=ERRORS, tags=["trainings"])
    def start_training(
        body: TrainingIn,
        key: Caller,
        idempotency_key: Annotated[
            str | None, Header(max_length=255, description="the same key, the same training")
        ] = None,
    ) -> JSONResponse:
        """Train the user's model on their uploaded photos. 202 with the training; with an
        Idempotency-Key, sending the same request again answers the same training (and a
        different request under that key 409)."""
        view, replayed = service.start_training(
            key.namespace, key.name, body.user, body.preset, body.webhook_url, idempotency_key
        )
        headers = {"Location": f"/v1/trainings/{view['id']}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(view, status_code=202, headers=headers)

    @app.get("/v1/trainings/{training_id}", responses=ERRORS, tags=["trainings"])
    def get_training(training_id: str, key: Caller) -> dict[str, Any]:
        """State (queued, running, succeeded, failed), progress, photos kept and rejected with
        reasons, and a failure's reason and whose fault it was."""
        return service.training(key.namespace, training_id)

    @app.get(
        "/v1/trainings/{training_id}/contact_sheet.png",
        responses={200: {"content": {"image/png": {}}}, **ERRORS},
        response_class=Response,
        tags=["trainings"],
    )
    def contact_sheet(training_id: str, key: Caller) -> Response:
        """Preprocessing's contact sheet: each photo beside its crop, or why it was rejected."""
        return Response(service.contact_sheet(key.namespace, training_id), media_type="image/png")

    # ---------------------------------------------------------------- predictions

    @app.post("/v1/predictions", responses=ERRORS, tags=["predictions"])
    def predict(body: PredictionIn, key: Caller) -> dict[str, Any]:
        """Images of the user's model (base64 JPEGs, as the endpoint sent them): one prompt,
        or every avatar of a style pack. 503 with Retry-After while the model loads."""
        return service.predict(
            key.namespace, body.user, body.prompt, body.negative_prompt, body.pack, body.gen_args
        )

    @app.get("/v1/packs", responses=ERRORS, tags=["predictions"])
    def packs(key: Caller) -> dict[str, Any]:
        """The style packs a prediction may name."""
        from ..packs import load_pack, pack_files

        out = []
        for name in sorted(pack_files()):
            pack = load_pack(name)
            out.append(
                {
                    "name": name,
                    "description": pack.description,
                    "avatars": len(pack.styles) * len(pack.framings),
                }
            )
        return {"packs": out}

    return app


def _problem(exc: AvatarforgeError) -> JSONResponse:
    status = int(getattr(exc, "status", 500) or 500)
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after:
        headers["Retry-After"] = str(retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status >= 500 and not isinstance(exc, ApiError):
        reference = secrets.token_hex(4)
        log.error("error %s: %s", reference, exc, exc_info=exc)
        message = f"internal error (reference {reference})"
    else:
        message = str(exc)
    return JSONResponse(
        {"error": message, "client_fault": 400 <= status < 500},
        status_code=status,
        headers=headers,
    )


def _page_file(name: str) -> bytes:
    return (resources.files("avatarforge") / "data" / "api_web" / name).read_bytes()


def _watch(service: ApiService, stop: threading.Event) -> None:
    """Deliver webhooks until ``stop``; without a signing secret there are none to deliver."""
    try:
        outbox = service.outbox()
    except ApiError as exc:
        log.warning("webhooks off: %s", exc)
        return
    while not stop.is_set():
        try:
            outbox.run_once()
        except Exception:
            log.exception("webhook round failed")
        stop.wait(service.config.poll_s)
