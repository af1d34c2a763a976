"""One rule for every name that becomes a path, an S3 key or a Triton model name.

A user id names the training output folder, the ``<user>.tar.gz`` TargetModel under the MME
prefix, the Triton model and the photo prefix of an upload; a job id names the job's folder
under the service's work prefix. Both are checked here, by every entry point (CLI, packager,
training service, cloud client), so a name accepted in one place is never refused later.
"""

from __future__ import annotations

import re

from .errors import AvatarforgeError

# Triton model names and S3 keys: no '.', '/', spaces or case games with '..'; 1-63 chars.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
# Names the serving side uses for itself: a user may not take them.
SETUP_MODEL = "model_setup"
SHARED_BASE_PREFIX = "sd_base_"  # + base hash: one shared base model per base
RESERVED_USERS = (SETUP_MODEL,)
RESERVED_PREFIXES = (SHARED_BASE_PREFIX,)


class InvalidNameError(AvatarforgeError, ValueError):
    """A user or job id breaks the naming rule; the message says the rule."""

    status = 400


def check_user_id(user: object, *, field: str = "user") -> str:
    """``user`` if it is a valid user id; :class:`InvalidNameError` naming ``field`` otherwise."""
    if (
        not isinstance(user, str)
        or not _ID.fullmatch(user)
        or user in RESERVED_USERS
        or user.startswith(RESERVED_PREFIXES)
    ):
        raise InvalidNameError(
            f"{field}: {user!r} is not a valid user id: use 1-63 letters, digits, '_' or '-', "
            f"starting with a letter or digit (not {', '.join(RESERVED_USERS)} or "
            f"{', '.join(p + '*' for p in RESERVED_PREFIXES)}); it becomes a Triton model name "
            "and an S3 key"
        )
    return user


def check_job_id(job_id: object, *, field: str = "job_id") -> str:
    """``job_id`` if valid (same characters as a user id); :class:`InvalidNameError` otherwise."""
    if not isinstance(job_id, str) or not _ID.fullmatch(job_id):
        raise InvalidNameError(
            f"{field}: {job_id!r} is not a valid job id: use 1-63 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return job_id
