"""A user unloaded from the servers running on this machine.

- local-triton (``avatarforge serve local-triton``): every server started from this build folder
  has its control key in ``build/triton/keys/<HTTP port>`` while it runs. Its repository API
  (``POST /v2/repository/models/<user>/unload``, with the key) unloads the user's model.
  Triton answers before the model is gone ("does not wait for the requested model to be fully
  unload", TRITONSERVER_ServerUnloadModel in tritonserver.h), so the model's state is polled
  until it is no longer READY (a request in flight is finished first).
- the local MME (``avatarforge mme serve``): its front has no unload route; tritonserver's
  SageMaker front end behind it has one (``DELETE /models/<hash>``, which waits until the model
  is gone), at the URL ``mme serve`` prints as "SageMaker front". The MME's loader notices on
  the next request for that TargetModel (Triton answers 404: it drops its entry, deletes its
  files and loads again, which fails once the package is deleted).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import AvatarforgeError
from ..mme.loader import model_hash
from ..mme.protocol import SageMakerTritonClient, TritonMMEError
from ..names import check_user_id
from ..paths import build_dir
from ..tritonserver.control_key import ControlKeyError, headers, read_key
from .report import FAILED, UNLOADED, Report

LOADED_STATES = ("READY", "LOADING", "UNLOADING")
SHARED_BASE_NOTE = (
    "the shared base process (sd_base_*) of a server {user} was unloaded from may still hold "
    "{user}'s adapter weights in its host-memory adapter cache until other users' adapters "
    "evict them or the server stops; no request reaches them (only {user}'s own model named "
    "that adapter, and its files are gone)"
)
UNLOAD_WAIT_S = 120.0  # Triton finishes a request in flight first (a generation: seconds)
MME_UNLOAD_TIMEOUT_S = 400.0  # Triton's SageMaker unload waits up to 350 s for a busy model


def running_local_tritons(root: Path | None = None) -> list[int]:
    """HTTP ports of the local-triton servers this build folder started (their keys)."""
    keys = Path(root or build_dir()) / "triton" / "keys"
    try:
        return sorted(int(p.name) for p in keys.iterdir() if p.name.isdigit())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _state(client, user: str, key: dict[str, str]) -> str | None:
    """The user's model state in the server's repository index; None when it is not there."""
    for entry in client.get_model_repository_index(headers=key):
        if entry.get("name") == user:
            return str(entry.get("state") or "UNAVAILABLE")
    return None


def unload_local_triton(user: str, report: Report, *, wait_s: float = UNLOAD_WAIT_S) -> None:
    """Unload ``user`` from every running local-triton of this build folder."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    check_user_id(user)
    for port in running_local_tritons():
        url = f"127.0.0.1:{port}"
        target = f"http://{url} model {user}"
        try:
            key = headers(read_key(port))
        except ControlKeyError as exc:
            report.add("local-triton", "loaded model", target, FAILED, str(exc))
            continue
        client = httpclient.InferenceServerClient(url, network_timeout=wait_s)
        try:
            state = _state(client, user, key)
            if state not in LOADED_STATES:
                continue
            if not report.dry_run:
                client.unload_model(user, headers=key)
                deadline = time.monotonic() + wait_s
                while (now := _state(client, user, key)) in LOADED_STATES:
                    if time.monotonic() > deadline:
                        raise TimeoutError(  # an OSError: reported below as FAILED
                            f"still {now} {wait_s:.0f} s after the unload"
                        )
                    time.sleep(0.2)
            report.add("local-triton", "loaded model", target, UNLOADED, f"was {state}")
            report.note(SHARED_BASE_NOTE.format(user=user))
        except ConnectionRefusedError:  # nobody listens: a key left by a server that was killed
            continue
        except (InferenceServerException, OSError) as exc:
            message = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
            if isinstance(exc, InferenceServerException) and exc.status() == "403":
                message = (
                    f"the server on port {port} refused the control key: it is not the "
                    "local-triton this build folder started (a key left by a killed server? "
                    f"then remove {build_dir() / 'triton' / 'keys' / str(port)})"
                )
            report.add("local-triton", "loaded model", target, FAILED, message)
        finally:
            client.close()


class NotTheSageMakerFrontError(AvatarforgeError, OSError):
    """The URL answers, but not as tritonserver's SageMaker front end."""

    status = 400  # the caller named the wrong URL


def _check_sagemaker_front(url: str) -> None:
    """tritonserver's SageMaker front end lists ``{"models": [...]}``; the MME front (which has
    no unload) lists ``{"loaded": [...]}``."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=10) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise NotTheSageMakerFrontError(f"GET /models answered HTTP {exc.code}") from None
    except ValueError:
        data = None
    if not (isinstance(data, dict) and "models" in data):
        what = "the MME front" if isinstance(data, dict) and "loaded" in data else "it"
        raise NotTheSageMakerFrontError(
            f"{what} is not tritonserver's SageMaker front end: give the 'SageMaker front' URL "
            "that `avatarforge mme serve` prints"
        )


def unload_local_mme(user: str, sagemaker_url: str, report: Report) -> None:
    """Unload ``<user>.tar.gz`` from the local MME whose tritonserver SageMaker front end is at
    ``sagemaker_url``."""
    check_user_id(user)
    target_model = f"{user}.tar.gz"
    target = f"{sagemaker_url} TargetModel {target_model}"
    client = SageMakerTritonClient(sagemaker_url, load_timeout_s=MME_UNLOAD_TIMEOUT_S)
    digest = model_hash(target_model)
    try:
        _check_sagemaker_front(sagemaker_url)
        if report.dry_run:
            loaded = client.get(digest) is not None
        else:
            loaded = client.unload(digest, target_model)
    except (OSError, TritonMMEError) as exc:
        report.add("local MME", "loaded model", target, FAILED, str(exc))
        return
    if loaded:
        report.add("local MME", "loaded model", target, UNLOADED)
        report.note(SHARED_BASE_NOTE.format(user=user))
