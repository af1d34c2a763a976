"""The HTTP routes of tritonserver's SageMaker front end (``--allow-sagemaker=true``).

With ``SAGEMAKER_MULTI_MODEL=true`` (checked against tritonserver 2.51's sagemaker_server.cc):

- ``POST /models {"model_name": H, "url": D}`` + header ``X-Amzn-SageMaker-Target-Model: T``
  registers D (the folder holding the untarred model folder) as a repository whose model folder
  is mapped to the Triton model name T, loads it, and remembers it under H. 409 if H is taken,
  507 on out-of-memory, 400 with ``{"error": ...}`` otherwise.
- ``POST /models/H/invoke`` (KServe v2 JSON) runs Triton model T (the header; without it, H).
- ``DELETE /models/H`` (same header) unloads T, waits until it is gone (~2 s: Triton polls once
  a second) and unregisters D. 404 if H is unknown.
- ``GET /models`` lists ``{"modelName": H, "modelUrl": D}``; note that Triton checks readiness
  under H while the model is named T, so a loaded model appears as ``{}``: use ``GET /models/H``.

Plain stdlib HTTP: this runs in the serving environment too, which has no ``requests``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from ..errors import AvatarforgeError

TARGET_MODEL_HEADER = "X-Amzn-SageMaker-Target-Model"


class TritonMMEError(AvatarforgeError, RuntimeError):
    """Triton's SageMaker front end answered with an error; ``message`` is Triton's own."""

    def __init__(self, action: str, status: int, message: str) -> None:
        super().__init__(f"{action}: HTTP {status}: {message or '(no message)'}")
        self.action = action
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass(frozen=True)
class SageMakerTritonClient:
    """Calls of the SageMaker front end at ``url`` (e.g. ``http://127.0.0.1:8080``)."""

    url: str
    load_timeout_s: float = 600.0
    invoke_timeout_s: float = 60.0

    def load(self, model_hash: str, repo_dir: str, target_model: str) -> None:
        body = json.dumps({"model_name": model_hash, "url": repo_dir}).encode()
        response = self._request(
            "POST", "/models", body, target_model=target_model, timeout=self.load_timeout_s
        )
        _raise_for_status(f"load {target_model}", response)

    def unload(self, model_hash: str, target_model: str) -> bool:
        """True if it was loaded; False if the front end did not know it (404)."""
        path = f"/models/{model_hash}"
        response = self._request(
            "DELETE", path, target_model=target_model, timeout=self.load_timeout_s
        )
        if response.status == 404:
            return False
        _raise_for_status(f"unload {target_model}", response)
        return True

    def get(self, model_hash: str) -> dict[str, str] | None:
        response = self._request("GET", f"/models/{model_hash}")
        if response.status == 404:
            return None
        _raise_for_status(f"get {model_hash}", response)
        return response.json()

    def invoke(
        self,
        model_hash: str,
        target_model: str,
        body: bytes,
        content_type: str = "application/json",
    ) -> Response:
        """The raw response, whatever its status (the caller decides: 404 means not loaded)."""
        return self._request(
            "POST",
            f"/models/{model_hash}/invoke",
            body,
            target_model=target_model,
            content_type=content_type,
            timeout=self.invoke_timeout_s,
        )

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        target_model: str | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> Response:
        headers = {"Content-Type": content_type} if body is not None else {}
        if target_model is not None:
            headers[TARGET_MODEL_HEADER] = target_model
        request = urllib.request.Request(
            self.url.rstrip("/") + path, data=body, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return Response(r.status, r.read(), r.headers.get("Content-Type", ""))
        except urllib.error.HTTPError as err:
            with err:
                return Response(err.code, err.read(), err.headers.get("Content-Type", ""))


def error_message(response: Response) -> str:
    """Triton's ``{"error": ...}`` text, else the raw body."""
    try:
        data = response.json()
    except ValueError:
        return response.body.decode(errors="replace").strip()
    if isinstance(data, dict) and "error" in data:
        return str(data["error"])
    return response.body.decode(errors="replace").strip()


def _raise_for_status(action: str, response: Response) -> None:
    if response.status != 200:
        raise TritonMMEError(action, response.status, error_message(response))
