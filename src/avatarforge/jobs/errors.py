"""Errors of a training job: one root, :class:`JobError` (an
:class:`~avatarforge.errors.AvatarforgeError`), that says whose fault it was.

Every failure of a job leaves as a ``JobError`` (or a subclass) so that each adapter answers it
the same way: the DJL entry point turns ``status`` into the HTTP status of the invocation (a
non-2xx makes SageMaker write the failure to S3FailurePath and publish to the ErrorTopic), the
CLI into its exit code. ``client_fault`` (from the root: a 4xx ``status``) is True when
re-sending the same request cannot help (bad request, unusable photos); False for our failures,
which a retry may cure.
"""

from __future__ import annotations

from typing import Any

from ..errors import AvatarforgeError


class JobError(AvatarforgeError):
    """A training job failed; the message says why, ``status`` is HTTP-like (400, 409, 500...)."""

    status: int = 500

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.details: dict[str, Any] = dict(details or {})

    @property
    def message(self) -> str:
        return str(self)

    def to_dict(self) -> dict[str, Any]:
        """The failure as JSON (what a runner writes beside a failed invocation)."""
        return {
            "status": "failed",
            "code": self.status,
            "client_fault": self.client_fault,
            "error": str(self),
            **({"details": self.details} if self.details else {}),
        }


class JobRequestError(JobError):
    """The request itself is malformed or out of bounds; the message names the field."""

    status = 400


class JobTimeoutError(JobError):
    """The job reached its deadline; its checkpoint (if any step ran) is saved for a resume."""

    status = 504

    def __init__(
        self, message: str, *, step: int = 0, total: int = 0, checkpoint_uri: str = ""
    ) -> None:
        super().__init__(
            message, details={"step": step, "total": total, "checkpoint_uri": checkpoint_uri}
        )
        self.step, self.total, self.checkpoint_uri = step, total, checkpoint_uri
