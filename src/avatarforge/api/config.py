"""ApiConfig: the HTTP API's settings (keys, rate limit, webhooks, presets), from one JSON file.

::

    {"keys": [{"name": "photo-app", "sha256": "<hex of the key>", "namespace": "photoapp"}],
     "rate_per_minute": 120, "burst": 30,
     "webhook_secret_env": "AVATARFORGE_API_WEBHOOK_SECRET",
     "presets": {"default": {}, "quick": {"steps": 200}}}

API keys are random tokens (``afk_`` + 43 characters, :func:`new_key`); the file holds only
their sha256 (a slow password hash buys nothing for 256 random bits, and would cost every
request). A key's ``namespace`` is where its users live: a key sees only the users and
trainings of its own namespace (:mod:`.tenancy`); two keys share one only when they name it
(a key being rotated). The webhook secret is read from the environment variable the file
names, never from the file, since whoever holds it can forge webhooks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..settings import ConfigError, Settings, setting

KEY_PREFIX = "afk_"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# A namespace starts every user id of its key (<namespace>-<user>): no '-' or '_' in it, so
# the first '-' of an internal id always ends the namespace (no two keys share an id).
_NAMESPACE = re.compile(r"^[a-z0-9]{1,12}$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MIN_SECRET_BYTES = 32


def new_key() -> str:
    """A new API key: ``afk_`` + 32 random bytes (urlsafe base64)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """What the configuration keeps of a key: its sha256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One API key as configured: a name for logs and limits, its hash, its namespace."""

    name: str
    sha256: str
    namespace: str

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ApiKey:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: must be an object with name, sha256, namespace")
        unknown = sorted(set(data) - {"name", "sha256", "namespace"})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
        name, digest = data.get("name"), data.get("sha256")
        namespace = data.get("namespace", name)
        if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
            raise ConfigError(f"{where}.name: 1-63 letters, digits, '_', '.', '-' (got {name!r})")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ConfigError(
                f"{where}.sha256: the key's sha256 as 64 lower-case hex digits "
                "(avatarforge api new-key prints it)"
            )
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ConfigError(
                f"{where}.namespace: 1-12 lower-case letters and digits (got {namespace!r}); "
                "it starts the ids of the key's users"
            )
        return cls(name, digest, namespace)


@dataclass
class ApiConfig(Settings):
    """Settings of the HTTP API (``avatarforge api --api-config FILE``)."""

    section = "api"

    keys: list = setting(  # noqa: RUF009 (setting() gives a list its own factory)
        [], "API keys: objects of name, sha256 (of the key) and namespace; none: every request 401"
    )
    rate_per_minute: float = setting(
        120.0, "requests a key may make per minute, on average", ge=1, le=100000
    )
    burst: int = setting(30, "requests a key may make at once before the rate applies", ge=1)
    predict_wait_s: float = setting(
        20.0,
        "how long a prediction waits for a loading user model before it answers 503 with "
        "Retry-After",
        ge=0,
        le=55,
    )
    retry_after_s: int = setting(10, "Retry-After of a 503 while a user model loads", ge=1, le=300)
    presets: dict = setting(  # noqa: RUF009
        {"default": {}},
        "training presets a client may name: bounded training overrides (the training "
        "service's TRAIN_OVERRIDES) per name",
    )
    webhook_secret_env: str = setting(
        "AVATARFORGE_API_WEBHOOK_SECRET",
        "environment variable holding the webhook signing secret (at least 32 bytes)",
    )
    webhook_attempts: int = setting(8, "deliveries tried per webhook event", ge=1, le=30)
    webhook_backoff_s: float = setting(
        10.0, "wait before the 2nd delivery; doubled for each further one", ge=0.01, le=3600
    )
    webhook_backoff_max_s: float = setting(3600.0, "longest wait between deliveries", ge=0.01)
    webhook_timeout_s: float = setting(10.0, "timeout of one webhook delivery", ge=0.1, le=60)
    webhook_allow_private: bool = setting(
        False,
        "allow webhook URLs that resolve to loopback, private, link-local or other non-public "
        "addresses (tests and a closed network only)",
    )
    poll_s: float = setting(
        10.0, "how often trainings with a pending webhook are looked at", ge=0.05, le=600
    )
    max_prompt_chars: int = setting(
        2000, "longest prompt or negative prompt a prediction may send", ge=1, le=100000
    )

    def validate(self) -> None:
        seen_names, seen_hashes = set(), set()
        parsed = []
        for i, data in enumerate(self.keys):
            key = data if isinstance(data, ApiKey) else ApiKey.from_dict(data, f"api.keys[{i}]")
            if key.name in seen_names or key.sha256 in seen_hashes:
                raise ConfigError(f"api.keys[{i}]: a second key with this name or hash")
            seen_names.add(key.name)
            seen_hashes.add(key.sha256)
            parsed.append(key)
        self.keys = parsed
        if not isinstance(self.presets, dict) or not self.presets:
            raise ConfigError("api.presets: an object of preset name -> training overrides")
        from ..jobs.request import TRAIN_OVERRIDES

        for name, values in self.presets.items():
            if not _KEY_NAME.fullmatch(name) or not isinstance(values, dict):
                raise ConfigError(f"api.presets.{name}: an object of training overrides")
            unknown = sorted(set(values) - set(TRAIN_OVERRIDES))
            if unknown:
                raise ConfigError(
                    f"api.presets.{name}: {', '.join(unknown)} cannot be set by a request "
                    f"(allowed: {', '.join(TRAIN_OVERRIDES)})"
                )

    def webhook_secret(self, environ: dict[str, str] | None = None) -> bytes:
        """The signing secret; ConfigError when it is unset or short (webhooks then cannot be
        asked for: a training with a webhook URL is refused, 503)."""
        environ = os.environ if environ is None else environ
        value = environ.get(self.webhook_secret_env, "")
        if len(value.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"{self.webhook_secret_env}: the webhook signing secret is "
                f"{'unset' if not value else 'shorter than 32 bytes'} (e.g. `openssl rand -hex 32`)"
            )
        return value.encode()

    @classmethod
    def read(cls, path: Path) -> ApiConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: must hold a JSON object of api settings")
        try:
            return cls.from_dict(data)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
