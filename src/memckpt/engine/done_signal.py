"""A save's end made visible to other processes: a file the engine creates, and a wait for it.

Framework async queues (NVRx's and Megatron's ``AsyncCallsQueue(persistent=False)``) run a
request's ``async_fn`` in a forked child and call the save done when that child exits;
their finalize functions then run on the training thread. memckpt's engine commits in a
thread of the training process, which a forked child does not have. So a request's
``async_fn`` is a :class:`DoneSignal`: called, it waits until the file exists, polling only
the filesystem (safe after a fork of a process with threads, and in a spawned process);
:func:`signal_when_done` creates the file once the save's handle has finished, committed
or failed. The finalize functions read the outcome from the handle.

Call sequence (one rank, one async save)::

    signal = new_signal(runtime, step)                # caller thread
    handle = runtime.engine.save(step, ..., blocking=False)
    signal_when_done(handle, signal, before=hook)     # engine thread: hook(handle), then set
    request = AsyncRequest(signal, (), [finalize])    # queue: async_fn waits, finalize raises
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from memckpt.engine.handle import SaveHandle
from memckpt.errors import MemckptError
from memckpt.ids import JobLayout

__all__ = ["DoneSignal", "new_signal", "signal_when_done"]

log = logging.getLogger(__name__)

_MAX_POLL_S: Final = 0.01
_cleaned: set[tuple[Path, int]] = set()  # (directory, rank) this process has swept


class DoneSignal:
    """A file that appears when a save has ended; picklable, waitable from any process.

    Calling it waits (the ``async_fn`` of a request). The wait returns early when the
    process that made the signal is gone (a forked or spawned waiter never outlives
    the trainer) and raises MemckptError after ``timeout_s``.
    """

    def __init__(self, path: str | os.PathLike[str], owner_pid: int, timeout_s: float) -> None:
        self.path = str(path)
        self.owner_pid = owner_pid
        self.timeout_s = timeout_s

    def is_set(self) -> bool:
        return os.path.exists(self.path)

    def set(self) -> None:
        """Create the file atomically (a waiter never sees it half made)."""
        tmp = f"{self.path}.tmp"
        with open(tmp, "wb"):
            pass
        os.replace(tmp, self.path)

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def wait(self) -> None:
        """Return once set, or once the owner process is gone; raise after ``timeout_s``."""
        deadline = time.monotonic() + self.timeout_s
        delay = 0.0005
        while not self.is_set():
            if os.getpid() != self.owner_pid and os.getppid() != self.owner_pid:
                return  # the training process died: nobody waits for this save any more
            if time.monotonic() > deadline:
                raise MemckptError(
                    f"memory checkpoint save still not finished after {self.timeout_s:.0f}s "
                    f"(waiting for {self.path}); see the training process's log"
                )
            time.sleep(delay)
            delay = min(delay * 2, _MAX_POLL_S)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.wait()

    def __repr__(self) -> str:
        return f"DoneSignal({self.path!r})"


def new_signal(layout: JobLayout, rank: int, step: int, timeout_s: float) -> DoneSignal:
    """A fresh, unset signal for ``rank``'s save of ``step`` under the job's signals folder.

    The first call of a process for a rank removes that rank's signals left by earlier
    processes (requests that were never finalized).
    """
    directory = layout.signals_dir
    directory.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    if (directory, rank) not in _cleaned:
        for p in directory.glob(f"rank-{rank}.*"):
            if f".{pid}." not in p.name:
                p.unlink(missing_ok=True)
        _cleaned.add((directory, rank))
    name = f"rank-{rank}.step-{step}.{pid}.{time.monotonic_ns()}.done"
    return DoneSignal(directory / name, pid, timeout_s)


def signal_when_done(
    handle: SaveHandle,
    signal: DoneSignal,
    before: Callable[[SaveHandle], None] | None = None,
) -> None:
    """Set ``signal`` once ``handle``'s save has ended, after ``before(handle)`` if given.

    Runs on the engine's thread right when the save ends (not after work queued behind
    it). ``before``'s exceptions are logged; the signal is set regardless, so a waiter
    never hangs on a failed hook.
    """

    def done(h: SaveHandle) -> None:
        try:
            if before is not None:
                before(h)
        except Exception:
            log.exception("after the save of %s", signal.path)
        finally:
            signal.set()

    handle.add_done_callback(done)
