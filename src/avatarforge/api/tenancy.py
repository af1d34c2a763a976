"""Which key sees what: a client's user id inside its key's namespace, and back.

A deployment knows one flat set of user ids (S3 keys, TargetModels, Triton model names). The API
gives each key a namespace and stores a client's user ``alice`` of namespace ``app1`` as
``app1-alice``: a namespace has no ``-``, so the first ``-`` of a stored id ends it, and no user
of one namespace can be named like a user of another. A client's id follows the one rule of
:mod:`avatarforge.names` (1-63 characters); where ``<namespace>-<user>`` would pass 63, the
stored id keeps the user's first characters and ends in a hash of the whole id, and is then
exactly 63 long (a literal one is at most 62), so the two forms never meet.

Training ids are job ids of the namespace: ``<namespace>-t<hex>``, random or, with an
Idempotency-Key, derived from it. A client never sees another namespace's ids: a lookup of one
is answered 404, as if it did not exist.
"""

from __future__ import annotations

import hashlib
import secrets

from ..names import check_job_id, check_user_id

MAX_ID_LENGTH = 63  # avatarforge.names: 1-63 characters
HASHED_TAIL = 16  # hex characters of sha256 that end a shortened id


def internal_user(namespace: str, user: str, *, field: str = "user") -> str:
    """The deployment's user id of the client's ``user`` in ``namespace``; a bad ``user`` is
    refused by the names rule, naming ``field``."""
    check_user_id(user, field=field)
    whole = f"{namespace}-{user}"
    if len(whole) < MAX_ID_LENGTH:
        return check_user_id(whole, field=field)
    digest = hashlib.sha256(whole.encode()).hexdigest()[:HASHED_TAIL]
    keep = MAX_ID_LENGTH - len(namespace) - 2 - HASHED_TAIL
    return check_user_id(f"{namespace}-{user[:keep]}-{digest}", field=field)


def owns(namespace: str, internal_id: str) -> bool:
    """Does the stored user or job id belong to ``namespace``?"""
    return internal_id.partition("-")[0] == namespace and "-" in internal_id


def new_training_id(namespace: str, idempotency_key: str | None = None) -> str:
    """A job id in ``namespace``: random, or the same for the same Idempotency-Key."""
    if idempotency_key is None:
        tail = secrets.token_hex(8)
    else:
        tail = hashlib.sha256(f"{namespace}\0{idempotency_key}".encode()).hexdigest()[:24]
    return check_job_id(f"{namespace}-t{tail}")
