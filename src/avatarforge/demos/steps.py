"""Running a demo's steps in order, reporting each to the caller (the CLI prints them)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

State = TypeVar("State")
OnStep = Callable[[int, str], None]  # (number, title) before a step
OnDone = Callable[[int, str, float], None]  # (number, what it did, seconds) after it


def run_steps(
    steps: Sequence[tuple[str, Callable[[State], str]]],
    state: State,
    on_step: OnStep | None = None,
    on_done: OnDone | None = None,
) -> dict[str, float]:
    """Run each ``(title, step)`` on ``state``; returns each step's seconds by title."""
    seconds: dict[str, float] = {}
    for i, (title, step) in enumerate(steps, 1):
        if on_step is not None:
            on_step(i, title)
        started = time.perf_counter()
        what = step(state)
        seconds[title] = time.perf_counter() - started
        if on_done is not None:
            on_done(i, what, seconds[title])
    return seconds
