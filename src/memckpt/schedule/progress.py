"""Throttled ``step`` events, so a watcher outside the process sees how far training got."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Final

from memckpt.storage import events

__all__ = ["STEP_EVENT_EVERY_S", "ProgressEvents"]

STEP_EVENT_EVERY_S: Final = 0.5
"""At most one ``step`` event per this many seconds while iterating."""


class ProgressEvents:
    """Emits ``{"event": "step", "iter": n, "step": s}`` at most every ``every_s`` seconds.

    Does nothing unless ``MEMCKPT_EVENTS_FILE`` is set (checked at every call, a dict
    lookup). ``flush()`` emits the latest progress if it was not reported yet; call it
    before leaving so a clean exit is never ``every_s`` behind. ``step`` is the caller's
    training step, absent when the caller never gave one.
    """

    def __init__(self, clock: Callable[[], float], every_s: float = STEP_EVENT_EVERY_S) -> None:
        self._clock = clock
        self._every_s = every_s
        self._last_emit: float | None = None
        self._iters = 0
        self._step: int | None = None
        self._reported: tuple[int, int | None] | None = None

    def tick(self, iters: int, step: int | None) -> None:
        """Record progress; emit it if the previous event is ``every_s`` old."""
        self._iters, self._step = iters, step
        if not os.environ.get(events.EVENTS_FILE_ENV):
            return
        now = self._clock()
        if self._last_emit is None or now - self._last_emit >= self._every_s:
            self._emit(now)

    def flush(self, *, final: bool = False, step: int | None = None) -> None:
        """Emit the latest progress unless already reported; always when ``final``.

        ``step`` stands in for the step when ``tick`` never received one. A final event
        carries ``"final": true`` (the process is leaving the training loop).
        """
        if step is not None and self._step is None:
            self._step = step
        if not os.environ.get(events.EVENTS_FILE_ENV):
            return
        if final or self._reported != (self._iters, self._step):
            self._emit(self._clock(), final=final)

    def _emit(self, now: float, final: bool = False) -> None:
        fields: dict[str, Any] = {"iter": self._iters}
        if self._step is not None:
            fields["step"] = self._step
        if final:
            fields["final"] = True
        events.emit("step", **fields)
        self._last_emit = now
        self._reported = (self._iters, self._step)
