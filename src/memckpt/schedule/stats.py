"""Iteration and save timings: what the schedule predicts from."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memckpt.errors import ScheduleConfigError

__all__ = ["IterationStats", "IterationTimer", "SaveCosts", "summarize"]


@dataclass(frozen=True)
class IterationStats:
    """Summary of iteration durations, in seconds.

    ``warmup_only`` is True when no iteration after warm-up was measured yet and the
    summary falls back to the (slower) warm-up iterations.
    """

    count: int
    mean_s: float
    p95_s: float
    max_s: float
    warmup_only: bool = False


def summarize(durations: Sequence[float], *, warmup_only: bool = False) -> IterationStats | None:
    """Mean, nearest-rank 95th percentile and maximum of ``durations``; None when empty."""
    if not durations:
        return None
    ordered = sorted(durations)
    n = len(ordered)
    p95 = ordered[max(0, math.ceil(0.95 * n) - 1)]
    return IterationStats(n, math.fsum(ordered) / n, p95, ordered[-1], warmup_only)


class IterationTimer:
    """Measures the time between consecutive ``tick()`` calls, setting warm-up iterations apart.

    The first ``warmup`` durations (compilation, allocator and data-loader start-up) and
    any iteration marked with ``exclude_current()`` (one that also ran a save) stay out of
    the statistics. Only the newest ``window`` durations are kept.
    """

    def __init__(self, clock: Callable[[], float], warmup: int, window: int = 1000) -> None:
        if warmup < 0:
            raise ScheduleConfigError(f"warmup must be >= 0, got {warmup}")
        if window < 1:
            raise ScheduleConfigError(f"window must be >= 1, got {window}")
        self._clock = clock
        self._warmup = warmup
        self._last: float | None = None
        self._exclude_current = False
        self._warmup_durations: list[float] = []
        self._durations: deque[float] = deque(maxlen=window)
        self.ticks = 0

    def tick(self) -> float | None:
        """Mark the start of an iteration; return the duration of the previous one, if any."""
        now = self._clock()
        last, self._last = self._last, now
        self.ticks += 1
        excluded, self._exclude_current = self._exclude_current, False
        if last is None:
            return None
        duration = max(0.0, now - last)
        if len(self._warmup_durations) < self._warmup:
            self._warmup_durations.append(duration)
        elif not excluded:
            self._durations.append(duration)
        return duration

    def exclude_current(self) -> None:
        """Keep the iteration in progress out of the statistics (it also ran a save)."""
        self._exclude_current = True

    @property
    def measured(self) -> int:
        """Number of durations after warm-up held in the window."""
        return len(self._durations)

    def stats(self) -> IterationStats | None:
        """Statistics after warm-up; the warm-up iterations when none came after them yet."""
        if self._durations:
            return summarize(self._durations)
        return summarize(self._warmup_durations, warmup_only=True)


class SaveCosts:
    """Recent save timings; the median of the newest ``window`` saves resists one slow save."""

    def __init__(self, window: int = 5) -> None:
        if window < 1:
            raise ScheduleConfigError(f"window must be >= 1, got {window}")
        self._blocking: deque[float] = deque(maxlen=window)
        self._total: deque[float] = deque(maxlen=window)
        self.count = 0

    def add(self, blocking_s: float, total_s: float) -> None:
        self._blocking.append(blocking_s)
        self._total.append(total_s)
        self.count += 1

    @property
    def blocking_s(self) -> float | None:
        """Median time a save held up training, or None before the first save."""
        return statistics.median(self._blocking) if self._blocking else None

    @property
    def total_s(self) -> float | None:
        """Median time from starting a save to its completion, or None before the first save."""
        return statistics.median(self._total) if self._total else None
