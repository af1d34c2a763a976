"""Who is calling: an API key from ``Authorization: Bearer <key>``, found by its sha256, and a
rate limit per key (a token bucket: ``burst`` at once, ``rate_per_minute`` on average).

The bucket lives in this process: behind a load balancer with N replicas a key gets up to N
times the rate. The gateway in front (deploy: the operator's) is where a fleet-wide limit goes.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from .config import ApiConfig, ApiKey, hash_key
from .service import ApiError


class Keyring:
    def __init__(self, config: ApiConfig) -> None:
        self._by_hash = {key.sha256: key for key in config.keys}

    def identify(self, authorization: str | None) -> ApiKey:
        """The key of an ``Authorization`` header; 401 for none or an unknown one."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError("no API key: send the header 'Authorization: Bearer <key>'", 401)
        key = self._by_hash.get(hash_key(token.strip()))  # a digest: nothing to time
        if key is None:
            raise ApiError("unknown API key", 401)
        return key


class RateLimiter:
    def __init__(
        self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = burst
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key name -> (tokens, at)

    def take(self, name: str) -> None:
        """One request of key ``name``; 429 with Retry-After when its bucket is empty."""
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get(name, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[name] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / self.rate)
                raise ApiError(
                    f"rate limit of key {name!r}: {self.rate * 60:g} requests per minute "
                    f"(burst {self.burst}); retry in {wait} s",
                    429,
                    retry_after=wait,
                )
            self._buckets[name] = (tokens - 1.0, now)
