"""How fast the shared base denoises, and whether a request can be done within its time.

Every pipeline call of the shared base times its denoising steps (the pipeline's per-step
callback) and leaves its fastest step here (its first, which also encodes the prompt, when it
ran no other), under the shape of its work (:class:`StepShape`).
From these, :meth:`Pace.least_seconds` bounds from below what a request still needs, which
:mod:`.handler` compares with its time: over ``serving.request_timeout_s`` it is refused before
any work (400, naming what to change); over what is left of its time when its turn comes it is
skipped (503, retry); a run that can no longer end in time stops at once instead of at its
deadline (:class:`RunClock`).

A CPU's pace swings tenfold with its load (the tiny base's 512 px step: 0.10 s on a quiet 2-core
CPU, 0.3-1.2 s while two busy loops ran beside it), so a bound must not follow one slow
moment. It takes, for each shape of work, the FASTEST step that shape reached in the last
PACE_MEMORY_S, and only from shapes that at least EVIDENCE_CALLS calls measured: a load spike
(fast steps before it stay remembered) or one slow call never turns a request that would finish
into a refusal. A refusal also needs a measurement from the last PROBE_S: refused requests are
never measured, so without it a pace measured under a load that has since gone would refuse
their shape until it is forgotten; after PROBE_S one runs again (stopped after a few steps if
the pace has not changed, which measures it anew). A larger step takes at least as long as a
smaller one (more pixels or more images, on any device), so a shape bounds every request at
least as large; no scaling between sizes is assumed (a GPU's step time is far from
proportional to pixels).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..generate import GenArgs

PACE_MEMORY_S = 600.0  # how long a measured step counts
EVIDENCE_CALLS = 2  # calls of a shape needed before its steps bound anything
PROBE_S = 60.0  # a refusal needs a measurement this recent
MAX_SAMPLES = 512  # the newest calls remembered
MIN_RUN_STEPS = 2  # step intervals a run times itself before its own pace counts


@dataclass(frozen=True)
class StepShape:
    """The work of one denoising step of one pipeline call."""

    pixels: int  # height x width of each image
    images: int  # images through the UNet at once: rows x num_images, twice with guidance

    def within(self, other: StepShape) -> bool:
        return self.pixels <= other.pixels and self.images <= other.images

    @classmethod
    def of(cls, rows: Sequence[GenArgs]) -> StepShape:
        """The step of one pipeline call of these rows (they share size and guidance)."""
        first = rows[0]
        guided = 2 if first.guidance_scale > 1 else 1  # the pipeline's unconditional half
        return cls(first.height * first.width, guided * sum(r.num_images for r in rows))


class Pace:
    """The fastest denoising step of each shape of work in the last ``memory_s``."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        memory_s: float = PACE_MEMORY_S,
        evidence: int = EVIDENCE_CALLS,
    ) -> None:
        self.clock, self.memory_s, self.evidence = clock, memory_s, evidence
        self._samples: deque[tuple[float, StepShape, float]] = deque(maxlen=MAX_SAMPLES)

    def record(self, shape: StepShape, step_s: float) -> None:
        """One call's fastest step (seconds) at ``shape``."""
        if step_s > 0 and math.isfinite(step_s):
            self._samples.append((self.clock(), shape, step_s))

    def step_s(self, shape: StepShape, measured_within: float | None = None) -> float | None:
        """At least how long a step of ``shape`` takes, by what was measured (None: not
        known): the slowest of the fastest steps of the shapes within it that EVIDENCE_CALLS
        calls measured in the last ``memory_s`` (and one of them in the last
        ``measured_within`` seconds, when given)."""
        now = self.clock()
        fastest: dict[StepShape, float] = {}
        calls: dict[StepShape, int] = {}
        newest: dict[StepShape, float] = {}
        for at, measured, seconds in self._samples:
            if at >= now - self.memory_s and measured.within(shape):
                fastest[measured] = min(seconds, fastest.get(measured, math.inf))
                calls[measured] = calls.get(measured, 0) + 1
                newest[measured] = max(at, newest.get(measured, -math.inf))
        recent = now - (self.memory_s if measured_within is None else measured_within)
        known = [fastest[s] for s, n in calls.items() if n >= self.evidence and newest[s] >= recent]
        return max(known) if known else None

    def fastest(self, shape: StepShape) -> float | None:
        """The fastest step measured for exactly ``shape`` in the last ``memory_s`` (None:
        none): what a run of that shape may hope for while load slows it."""
        since = self.clock() - self.memory_s
        steps = [s for at, measured, s in self._samples if at >= since and measured == shape]
        return min(steps) if steps else None

    def least_seconds(
        self, calls: Sequence[tuple[StepShape, int]], measured_within: float | None = None
    ) -> float:
        """At least how long pipeline calls of (shape, steps) take, by what was measured
        (0 for a shape not known: no bound); ``measured_within``: as for :meth:`step_s`."""
        return sum(steps * (self.step_s(shape, measured_within) or 0.0) for shape, steps in calls)


class RunClock:
    """One pipeline call's steps as they happen: its fastest step so far, and whether it can
    still end before ``deadline`` (unix time) at the better of that pace and ``known_step_s``
    (:meth:`Pace.fastest` of its shape before it started: a run slowed by a load spike is not
    stopped if the same work once went faster; smaller work's pace says nothing here)."""

    def __init__(self, deadline: float | None, known_step_s: float | None = None) -> None:
        self.deadline, self.known_step_s = deadline, known_step_s
        self.done, self.total = 0, 0
        self.fastest: float | None = None  # fastest step interval, the first step excluded
        self.first_s: float | None = None  # the first step, with the prompt's encoding
        self.intervals = 0
        self.begin()

    def begin(self) -> None:
        """The pipeline call starts now."""
        self.started, self._last = time.time(), time.monotonic()

    def step(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.done:
            interval = now - self._last
            self.fastest = interval if self.fastest is None else min(self.fastest, interval)
            self.intervals += 1
        else:
            self.first_s = now - self._last
        self._last, self.done, self.total = now, done, total

    def measured_s(self) -> float | None:
        """What this run tells :class:`Pace`: its fastest step, or its first (a little longer:
        it also encodes the prompt) when it ran no other."""
        return self.fastest if self.fastest is not None else self.first_s

    def pace_s(self) -> float | None:
        """The best step time to judge the rest by (None: not known yet)."""
        own = self.fastest if self.intervals >= MIN_RUN_STEPS else None
        known = [s for s in (own, self.known_step_s) if s is not None]
        return min(known) if known else None

    def least_rest_s(self) -> float | None:
        pace = self.pace_s()
        return None if pace is None else (self.total - self.done) * pace

    def hopeless(self) -> bool:
        """Whether the rest cannot end before the deadline even at the best pace known."""
        rest = self.least_rest_s()
        return self.deadline is not None and rest is not None and time.time() + rest > self.deadline

    def elapsed_s(self) -> float:
        return time.time() - self.started
