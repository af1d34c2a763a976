"""Who may call the shared base: only this instance's user models, each with its own adapter.

The shared base (``sd_base_<hash>``) is a model like any other on tritonserver's ports: without
this check anyone who can reach them could generate with any user's adapter (any folder), learn
from its errors whether a path exists, and hold it busy without a deadline. A request is
answered only when

- its ``auth`` is :func:`~.bootstrap.caller_mac` over its ``adapter`` and ``deadline`` with the
  instance's key (:func:`~.bootstrap.instance_key`: a 0600 file only the instance's processes
  read; a user model signs its own packaged adapter folder and nothing else);
- its deadline is a time at most the instance's request timeout ahead (a client of a user
  model waits no longer);
- its adapter folder is a served user model's: ``<model>/1/adapter`` of a folder that is
  exactly what the packager writes (:func:`~.package_check.check_package`: the code byte for
  byte, the config, the weights' sha256), for this base. Its real path, not a prefix: there is
  no symlink in it and nothing but that layout passes.

Every refusal is the same :data:`~.bootstrap.CALLER_REFUSED` (the reason goes to the log).
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ..errors import AvatarforgeError
from . import bootstrap
from .handler import RequestError
from .package_check import PACKAGE_FILES, PackageError, check_package

log = logging.getLogger(__name__)

CLOCK_SLACK_S = 5.0  # a user model's clock is this machine's; slack for rounding and queueing
MAX_VERIFIED = 4096  # folders remembered as checked (more: checked again when met again)


class CallerRefused(RequestError):
    """The one answer to a request that is not from this instance's user models."""

    def __init__(self) -> None:
        super().__init__(bootstrap.CALLER_REFUSED.removeprefix(bootstrap.CLIENT_FAULT_PREFIX))


class Callers:
    """Checks the callers of one shared base (``base_hash``); ``key()`` reads the instance's
    key (read again when a check fails: the file may have been made anew)."""

    def __init__(
        self,
        key: Callable[[], bytes],
        base_hash: str,
        request_timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._read_key, self._key = key, key()
        self.base_hash, self.request_timeout_s, self.clock = base_hash, request_timeout_s, clock
        self._verified: dict[str, tuple] = {}  # real adapter path -> stat signature of its model

    def check(self, inputs: Mapping[str, np.ndarray | None]) -> str:
        """The user (its model folder's name) a request comes from; CallerRefused otherwise."""
        try:
            names = (bootstrap.ADAPTER_INPUT, bootstrap.DEADLINE_INPUT, bootstrap.AUTH_INPUT)
            adapter, deadline, auth = (_one(inputs, name) for name in names)
            self._check_mac(adapter, deadline, auth)
            self._check_deadline(deadline)
            return self._check_folder(adapter)
        except _Refused as exc:
            log.warning("refused a request to the shared base: %s", exc)
            raise CallerRefused() from None

    def _check_mac(self, adapter: str, deadline: str, auth: str) -> None:
        if hmac.compare_digest(bootstrap.caller_mac(self._key, adapter, deadline), auth):
            return
        key = self._read_key()
        if key != self._key:  # made anew since this process read it
            self._key = key
            if hmac.compare_digest(bootstrap.caller_mac(key, adapter, deadline), auth):
                return
        raise _Refused("no valid auth")

    def _check_deadline(self, text: str) -> None:
        try:
            deadline = float(text)
        except ValueError:
            raise _Refused(f"deadline {text!r} is not a number") from None
        latest = self.clock() + self.request_timeout_s + CLOCK_SLACK_S
        if not math.isfinite(deadline) or deadline > latest:
            raise _Refused(f"deadline {text!r} is further than the request timeout")

    def _check_folder(self, adapter: str) -> str:
        folder = Path(adapter)
        if not folder.is_absolute() or os.path.realpath(folder) != str(folder):
            raise _Refused("the adapter folder is not a real absolute path")
        model = folder.parent.parent
        if folder.name != bootstrap.ADAPTER_SUBDIR or folder.parent.name != "1":
            raise _Refused("not the adapter folder of a user model")
        signature = _signature(model)
        if signature is None:
            raise _Refused("not a complete user model folder")
        if self._verified.get(adapter) != signature:
            try:
                check_package(model, loaded=True)
                meta = bootstrap.read_user_model(folder.parent, self.base_hash)
            except (PackageError, bootstrap.BootstrapError, OSError) as exc:
                raise _Refused(str(exc)) from None
            if meta != folder:
                raise _Refused("the adapter folder moved while it was checked")
            if len(self._verified) >= MAX_VERIFIED:
                self._verified.clear()
            self._verified[adapter] = signature
        return model.name


class _Refused(AvatarforgeError):
    """Why a request was refused (for the log only)."""


def _one(inputs: Mapping[str, np.ndarray | None], name: str) -> str:
    value = inputs.get(name)
    if value is None:
        raise _Refused(f"no {name}")
    texts = {bytes(v) if isinstance(v, bytes) else str(v).encode() for v in np.ravel(value)}
    if len(texts) != 1:
        raise _Refused(f"not one {name}")
    try:
        return texts.pop().decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused(f"{name} is not text") from None


def _signature(model: Path) -> tuple | None:
    """What changes when a file of a model folder does (None: one is missing)."""
    out = []
    for name in (*sorted(PACKAGE_FILES), ".", "1", f"1/{bootstrap.ADAPTER_SUBDIR}"):
        try:
            st = os.stat(model / name, follow_symlinks=False)
        except OSError:
            return None
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode))
    return tuple(out)
