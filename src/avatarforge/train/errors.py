"""Errors of the train step: a failed training raises, it never returns a result."""

from __future__ import annotations

from pathlib import Path

from ..errors import AvatarforgeError


class TrainingError(AvatarforgeError, RuntimeError):
    """Training could not run or did not produce a trustworthy adapter (no images, NaN loss...)."""


class TrainingStopped(TrainingError):
    """The run stopped early on purpose (``max_steps_this_run``, or the caller's
    ``should_stop``); run again to resume.

    Still an error: there is no adapter yet, and a caller must not treat the run as finished.
    """

    def __init__(
        self, step: int, total: int, checkpoint: Path, reason: str = "max_steps_this_run"
    ) -> None:
        super().__init__(
            f"stopped after step {step} of {total} ({reason}); checkpoint at "
            f"{checkpoint}; run again with the same output folder to resume"
        )
        self.step, self.total, self.checkpoint = step, total, checkpoint
        self.reason = reason
