"""The root of every error avatarforge raises on purpose, and whose fault it was.

Each step's errors derive from :class:`AvatarforgeError` (keeping a builtin base such as
``ValueError`` or ``LookupError`` where callers catch that), so one ``except`` catches them all and
every adapter answers them the same way: the CLI prints ``error: <message>`` without a traceback
and exits non-zero; the training service and the MME front answer ``status``.

The one error class that does not derive from it is ``serving.bootstrap.BootstrapError``: that
file is copied into every user model and runs under the stock image's bare Python, where
avatarforge is not installed (standard library only).
"""

from __future__ import annotations


class AvatarforgeError(Exception):
    """Something avatarforge refuses or cannot do; the message says what and why.

    ``status`` is the HTTP status it maps to: 500 (our failure, a retry may cure it) unless the
    class or the instance says otherwise — 400 a bad request, input or setting; 404 something
    named that does not exist; 409 a conflict with what is there; 413 too large; 504 a deadline.
    ``client_fault`` follows from it: a 4xx is the caller's to fix (the same request cannot
    succeed), anything else is ours.
    """

    status: int = 500

    @property
    def client_fault(self) -> bool:
        """True when the caller must change the request, input or setting (a 4xx status)."""
        return 400 <= self.status < 500
