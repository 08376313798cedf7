"""Signals that announce the end of the job (SIGTERM, SIGUSR1), recorded for the next decision."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final

from memckpt.errors import SignalInstallError

__all__ = ["DEFAULT_SIGNALS", "SignalEvent", "SignalWatcher", "signal_name"]

log = logging.getLogger(__name__)

DEFAULT_SIGNALS: Final[tuple[int, ...]] = tuple(
    int(s) for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s
)


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; ``signal 99`` for a number the platform does not name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class SignalEvent:
    """A signal that arrived: its number and when (unix seconds)."""

    signum: int
    received_unix: float

    @property
    def name(self) -> str:
        return signal_name(self.signum)


class SignalWatcher:
    """Records the first of ``signals`` to arrive; the handler only records, it never saves.

    A handler that was installed from Python before ``install()`` is called after the
    recording (chained); ``uninstall()`` puts the previous handlers back. Handlers can
    only be installed from the main thread of the main interpreter.
    """

    def __init__(
        self,
        signals: Sequence[int] = DEFAULT_SIGNALS,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.signals = tuple(int(s) for s in signals)
        self._wall_clock = wall_clock
        self._previous: dict[int, Any] = {}
        self.event: SignalEvent | None = None
        self.received = 0

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> None:
        """Install the handler for each watched signal; SignalInstallError off the main thread."""
        if self.installed:
            raise SignalInstallError("signal handlers are already installed by this watcher")
        if threading.current_thread() is not threading.main_thread():
            raise SignalInstallError(
                f"cannot install handlers for {[signal_name(s) for s in self.signals]} from "
                f"thread {threading.current_thread().name!r}: Python only allows it in the main "
                "thread; construct the IterManager there or pass signals=()"
            )
        try:
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self.handle)
        except (ValueError, OSError) as e:
            self.uninstall()
            raise SignalInstallError(f"cannot install signal handlers: {e}") from e
        log.debug("watching %s", ", ".join(signal_name(s) for s in self.signals))

    def uninstall(self) -> None:
        """Restore the handlers found by ``install()``; a no-op when not installed."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            if signal.getsignal(signum) != self.handle:
                log.warning(
                    "not restoring the %s handler: someone replaced memckpt's handler since",
                    signal_name(signum),
                )
                continue
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: record the signal, then call the previous Python handler."""
        self.received += 1
        if self.event is None:
            self.event = SignalEvent(signum, self._wall_clock())
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
