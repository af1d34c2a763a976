"""Webhooks: a training's end, POSTed to the URL its client gave, signed and retried.

Signature (what a receiver checks, :func:`verify`)::

    Avatarforge-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

over the exact body bytes, with the deployment's secret (:meth:`ApiConfig.webhook_secret`). A
receiver recomputes it, compares in constant time and refuses a ``t`` more than 5 minutes from
its clock (a replayed delivery). ``Avatarforge-Webhook-Id`` is the event's id, the same on every
retry: a receiver that saw it already answers 2xx and does nothing.

Where it may go: ``http``/``https`` only, no user:password, and every address the host resolves
to must be public (not loopback, private, link-local, shared, multicast or reserved) unless the
operator allows them (``webhook_allow_private``, for tests and closed networks). The name is
resolved again at each delivery and the connection goes to the address that was checked (TLS
still verifies the name), so a DNS answer that changes in between cannot aim it inside. No
redirect is followed, no proxy from the environment is used.

Delivery (:class:`Outbox`): each pending event is one object, ``<prefix>api/webhooks/<job>.json``,
so a restarted API, or another replica, carries on where one stopped; a replica takes a delivery
with a conditional write (If-Match on the object's ETag), so two replicas do not both send it.
A 2xx ends it; anything else is tried again after ``webhook_backoff_s``, doubled each time, up to
``webhook_attempts`` deliveries; then it is dropped and logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .. import storage
from ..errors import AvatarforgeError

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Avatarforge-Signature"
ID_HEADER = "Avatarforge-Webhook-Id"
EVENT_HEADER = "Avatarforge-Event"
TOLERANCE_S = 300
MAX_URL_CHARS = 2048


class WebhookUrlError(AvatarforgeError, ValueError):
    """A webhook URL that may not be used; the message says why."""

    status = 400


class SignatureError(AvatarforgeError, ValueError):
    """A delivery whose signature or timestamp does not hold."""

    status = 401


# ---------------------------------------------------------------------------- signatures


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``Avatarforge-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(
    secret: bytes,
    header: str | None,
    body: bytes,
    *,
    tolerance_s: float = TOLERANCE_S,
    now: float | None = None,
) -> int:
    """Check a delivery as a receiver does; its timestamp, or :class:`SignatureError`."""
    fields: dict[str, list[str]] = {}
    for part in (header or "").split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        raise SignatureError(f"{SIGNATURE_HEADER}: no t=<unix seconds>") from None
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError(
            f"{SIGNATURE_HEADER}: timestamp {timestamp} is more than {tolerance_s:g} s from now "
            "(a replayed or delayed delivery)"
        )
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    if not any(hmac.compare_digest(expected, given) for given in fields.get("v1", [])):
        raise SignatureError(f"{SIGNATURE_HEADER}: no v1 signature matches the body")
    return timestamp


# ---------------------------------------------------------------------------- destinations


@dataclass(frozen=True)
class Destination:
    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]  # what the host resolved to, every one allowed


Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (getaddrinfo, TCP)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # is_global is False for loopback, private (RFC 1918, fc00::/7), link-local, CGNAT
    # (100.64/10), documentation, benchmarking and reserved ranges
    return ip.is_global and not ip.is_multicast


def check_url(url: object, *, allow_private: bool, resolver: Resolver = resolve) -> Destination:
    """A webhook URL that may be used, resolved; :class:`WebhookUrlError` naming why not."""
    field = "webhook_url"
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise WebhookUrlError(f"{field}: an http(s) URL of at most {MAX_URL_CHARS} characters")
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in url):
        raise WebhookUrlError(f"{field}: printable ASCII only, no spaces (percent-encode)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlError(f"{field}: not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookUrlError(f"{field}: http or https only (got {parts.scheme!r})")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlError(f"{field}: no user or password in the URL (sign, do not embed)")
    host = parts.hostname
    if not host:
        raise WebhookUrlError(f"{field}: no host")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = resolver(host, port)
    except (OSError, UnicodeError) as exc:
        raise WebhookUrlError(f"{field}: {host!r} does not resolve ({exc})") from None
    if not addresses:
        raise WebhookUrlError(f"{field}: {host!r} does not resolve")
    if not allow_private:
        inside = [a for a in addresses if not _public(a)]
        if inside:
            raise WebhookUrlError(
                f"{field}: {host!r} resolves to {', '.join(inside)}, not a public address "
                "(loopback, private, link-local and reserved ranges are refused)"
            )
    return Destination(url, parts.scheme, host, port, tuple(addresses))


def deliver(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    allow_private: bool,
    timeout_s: float,
    resolver: Resolver = resolve,
) -> int:
    """POST ``body`` once to ``url``, connecting to an address that passed :func:`check_url`;
    the HTTP status (a network failure raises OSError)."""
    import httpx

    target = check_url(url, allow_private=allow_private, resolver=resolver)
    parts = urlsplit(url)
    address = target.addresses[0]
    netloc = f"[{address}]" if ":" in address else address
    path = parts.path or "/"
    pinned = urlunsplit((parts.scheme, f"{netloc}:{target.port}", path, parts.query, ""))
    host_header = parts.netloc.rpartition("@")[2]
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            response = client.post(
                pinned,
                content=body,
                headers={**headers, "Host": host_header, "Content-Type": "application/json"},
                extensions=extensions,
            )
    except httpx.HTTPError as exc:
        raise OSError(f"{type(exc).__name__}: {exc}") from None
    return response.status_code


# ---------------------------------------------------------------------------- the outbox


@dataclass(frozen=True)
class Pending:
    """One webhook to send: the training it waits for, and how delivery went so far."""

    job_id: str
    url: str
    attempts: int = 0
    next_at: float = 0.0  # time.time() of the next try
    event: dict[str, Any] | None = None  # fixed once the training ended
    last_error: str = ""

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Pending:
        raw = json.loads(data)
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


class Outbox:
    """Pending webhooks under ``prefix`` (an ``s3://`` folder), delivered by :meth:`run_once`.

    ``ended(job_id)`` returns the event of a training that ended, or None while it runs (or a
    ``"gone"`` marker dict when the training no longer exists: forgotten, then dropped).
    """

    def __init__(
        self,
        prefix: str,
        secret: bytes,
        ended: Callable[[str], dict[str, Any] | None],
        *,
        attempts: int,
        backoff_s: float,
        backoff_max_s: float,
        timeout_s: float,
        allow_private: bool,
        clock: Callable[[], float] = time.time,
        resolver: Resolver = resolve,
    ) -> None:
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.secret = secret
        self.ended = ended
        self.attempts, self.backoff_s, self.backoff_max_s = attempts, backoff_s, backoff_max_s
        self.timeout_s, self.allow_private = timeout_s, allow_private
        self.clock, self.resolver = clock, resolver
        self.delivered: list[str] = []  # event ids, this process (tests, logs)

    def uri(self, job_id: str) -> str:
        return f"{self.prefix}{job_id}.json"

    def add(self, job_id: str, url: str) -> None:
        """Wait for ``job_id`` to end, then tell ``url`` (one PUT; the first one stands)."""
        pending = Pending(job_id, url).to_json()
        with contextlib.suppress(storage.PreconditionFailedError):  # a replayed request
            storage.write_bytes(self.uri(job_id), pending, if_none_match=True)

    def run_once(self) -> int:
        """Look at every pending webhook once; the number delivered."""
        done = 0
        for obj in storage.list_prefix(self.prefix):
            try:
                done += self._one(obj.uri)
            except Exception:  # one bad entry must not stop the others
                log.exception("webhook %s: not handled", obj.uri)
        return done

    def _one(self, uri: str) -> int:
        try:
            data, etag = storage.read_bytes(uri, max_bytes=256 * 1024)
            pending = Pending.from_json(data)
        except storage.ObjectNotFoundError:
            return 0
        except (ValueError, TypeError, KeyError):
            log.error("webhook %s: unreadable, dropped", uri)
            storage.delete(uri)
            return 0
        now = self.clock()
        if pending.next_at > now:
            return 0
        event = pending.event or self.ended(pending.job_id)
        if event is None:
            return 0  # still running
        if event.get("gone"):
            log.info("webhook of %s dropped: the training no longer exists", pending.job_id)
            storage.delete(uri)
            return 0
        # take it: another replica that read the same ETag now fails its write
        wait = min(self.backoff_max_s, self.backoff_s * 2**pending.attempts)
        taken = Pending(pending.job_id, pending.url, pending.attempts + 1, now + wait, event)
        try:
            storage.write_bytes(uri, taken.to_json(), if_match=etag)
        except storage.PreconditionFailedError:
            return 0
        body = json.dumps(event, sort_keys=True).encode()
        headers = {
            ID_HEADER: str(event["id"]),
            EVENT_HEADER: str(event["type"]),
            SIGNATURE_HEADER: sign(self.secret, body, int(self.clock())),
            "User-Agent": "avatarforge-webhooks",
        }
        try:
            code = deliver(
                pending.url,
                body,
                headers,
                allow_private=self.allow_private,
                timeout_s=self.timeout_s,
                resolver=self.resolver,
            )
            error = "" if 200 <= code < 300 else f"HTTP {code}"
        except (OSError, WebhookUrlError) as exc:
            error = str(exc)
        if not error:
            storage.delete(uri)
            self.delivered.append(str(event["id"]))
            log.info("webhook %s delivered to %s", event["id"], pending.url)
            return 1
        if taken.attempts >= self.attempts:
            log.error(
                "webhook %s to %s dropped after %d deliveries: %s",
                event["id"], pending.url, taken.attempts, error,
            )  # fmt: skip
            storage.delete(uri)
            return 0
        log.warning("webhook %s to %s: %s; again in %.0f s", event["id"], pending.url, error, wait)
        failed = Pending(taken.job_id, taken.url, taken.attempts, taken.next_at, event, error[:500])
        try:
            storage.write_bytes(uri, failed.to_json())
        except storage.StorageError:
            log.exception("webhook %s: state not stored", event["id"])
        return 0
