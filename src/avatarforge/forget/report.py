"""What forgetting a user did: one :class:`Removal` per thing found, and notes on what stays."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DELETED, UNLOADED, FAILED = "deleted", "unloaded", "failed"
WOULD = {DELETED: "would delete", UNLOADED: "would unload"}  # --dry-run


@dataclass(frozen=True)
class Removal:
    """One thing of the user's, found and removed (or, in a dry run, that would be)."""

    where: str  # build, s3, local-triton, local MME
    what: str  # photos, dataset, training output, package, ... (docs/privacy.md)
    target: str  # a path, an s3:// URI or prefix, or server + model
    action: str  # deleted, unloaded, failed; or WOULD[...] in a dry run
    detail: str = ""  # how much (files, bytes, objects, versions), or why it failed

    @property
    def failed(self) -> bool:
        return self.action == FAILED


@dataclass
class Report:
    """Everything ``forget`` found for ``user``. Empty ``removals``: nothing of theirs is left
    where it looked (a second run finds nothing: forgetting is idempotent)."""

    user: str
    dry_run: bool = False
    removals: list[Removal] = field(default_factory=list)
    # what stays, and why: shared data, other people's copies, caches it cannot reach
    notes: list[str] = field(default_factory=list)
    # what is not done yet (a running job, a failed delete): run forget again
    pending: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.pending and not any(r.failed for r in self.removals)

    def add(self, where: str, what: str, target: str, action: str, detail: str = "") -> None:
        if self.dry_run and action in WOULD:
            action = WOULD[action]
        self.removals.append(Removal(where, what, target, action, detail))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "dry_run": self.dry_run,
            "complete": self.complete,
            "removals": [asdict(r) for r in self.removals],
            "pending": list(self.pending),
            "notes": list(self.notes),
        }


def size_text(files: int, size: int) -> str:
    """``3 files, 1.2 MiB``."""
    if size >= 2**20:
        amount = f"{size / 2**20:.1f} MiB"
    elif size >= 1024:
        amount = f"{size / 1024:.1f} KiB"
    else:
        amount = f"{size} B"
    return f"{files} file{'s' if files != 1 else ''}, {amount}"
