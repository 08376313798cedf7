"""What a save returns: a handle to wait on, and the result with its timings.

A step's durability (``memckpt.storage.durability``) rises, weakest first, through
``local`` (committed, one copy of every rank's data), ``replicated`` (committed with every
rank's data on k >= 2 distinct nodes; reached at the commit, whose vote waits for the
pushes) and ``persisted`` (the drain verified the whole step on the persistent tier). The
handle tells the tier reached, waits for one and calls back when one is reached; the
engine (``SaveEngine``, ``memckpt.engine.drain``) moves the :class:`StepDurability` it
holds for each step.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from memckpt.errors import InsufficientSpaceError
from memckpt.storage.durability import NONE, check_tier, tier_rank

__all__ = ["SaveHandle", "SaveResult", "StepDurability"]

log = logging.getLogger(__name__)

_callbacks: concurrent.futures.ThreadPoolExecutor | None = None
_callbacks_lock = threading.Lock()


def _run_callback(fn: Callable[[], None]) -> None:
    """Run ``fn`` on the one durability-callback thread: never on a save or drain worker,
    so a slow callback holds neither saves nor drains."""
    global _callbacks
    with _callbacks_lock:
        if _callbacks is None:
            _callbacks = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="memckpt-durability"
            )
        _callbacks.submit(_guarded, fn)


def _guarded(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:
        log.exception("a durability callback failed")


class StepDurability:
    """The durability tier one step has reached on this rank: it only rises. Thread-safe.

    ``open`` says whether a higher tier may still come: it closes once the commit is
    decided with no drain scheduled, once the step's drain ends (persisted or not), or
    when the save fails or is skipped. Waiters for a tier not reached then return False.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self._cond = threading.Condition()
        self._tier = NONE
        self._copies = 0
        self._where: str | None = None
        self._open = True
        self._waiting: list[tuple[int, Callable[[], None]]] = []

    @property
    def tier(self) -> str:
        with self._cond:
            return self._tier

    @property
    def copies(self) -> int:
        """Copies of the least-held rank's data when the step committed (0 before)."""
        with self._cond:
            return self._copies

    @property
    def where(self) -> str | None:
        """Where it was persisted (a directory or URL), once it was."""
        with self._cond:
            return self._where

    @property
    def open(self) -> bool:
        with self._cond:
            return self._open

    def reach(self, tier: str, *, copies: int | None = None, where: str | None = None) -> bool:
        """Record that the step reached ``tier``; True when that raised it. Callbacks of the
        tiers now reached run on the durability-callback thread."""
        want = tier_rank(check_tier(tier))
        with self._cond:
            if copies is not None:
                self._copies = max(self._copies, copies)
            if where is not None:
                self._where = where
            if want <= tier_rank(self._tier):
                return False
            self._tier = tier
            due = [fn for t, fn in self._waiting if t <= want]
            self._waiting = [(t, fn) for t, fn in self._waiting if t > want]
            self._cond.notify_all()
        for fn in due:
            _run_callback(fn)
        return True

    def close(self) -> None:
        """No higher tier is coming (for now): waiters for one return False."""
        with self._cond:
            self._open = False
            self._cond.notify_all()

    def reopen(self) -> None:
        """A drain was scheduled after all: a higher tier may come again."""
        with self._cond:
            self._open = True

    def wait_for(self, tier: str, timeout: float | None = None) -> bool:
        """Block until the step is at least as durable as ``tier`` (True), or until it
        cannot become so or ``timeout`` seconds pass (False)."""
        want = tier_rank(check_tier(tier))
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while tier_rank(self._tier) < want and self._open:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return tier_rank(self._tier) >= want

    def on_tier(self, tier: str, fn: Callable[[], None]) -> None:
        """Call ``fn()`` once the step reaches ``tier``: here, at once, if it has; else on
        the durability-callback thread when it does (never, if it does not)."""
        want = tier_rank(check_tier(tier))
        with self._cond:
            if tier_rank(self._tier) < want:
                self._waiting.append((want, fn))
                return
        _guarded(fn)


@dataclass(frozen=True)
class SaveResult:
    """A finished save. Times are seconds; ``total_s`` runs from ``save()`` to global commit."""

    step: int
    nbytes: int
    file_bytes: int
    num_tensors: int
    blocking_s: float
    stage_s: float
    checksum_s: float
    commit_s: float
    total_s: float
    path: str
    committed: bool = True
    replicated: bool = False
    replication_bytes: int = 0
    replication_s: float = 0.0
    non_finite: tuple[str, ...] = ()  # this rank's tensors that held NaN/Inf when saved
    step_finite: bool = True  # False when any rank saved NaN/Inf: recovery passes it over
    skipped: str | None = None  # why the save was skipped (no room); then not committed
    durability: str = "local"  # the tier reached when this result was made (handle.durability)
    copies: int = 1  # copies of every rank's data on distinct nodes, at the commit

    @classmethod
    def skip(cls, step: int, reason: str, blocking_s: float = 0.0) -> SaveResult:
        """The result of a save that did not fit and was skipped: nothing was written."""
        return cls(step=step, nbytes=0, file_bytes=0, num_tensors=0, blocking_s=blocking_s,
                   stage_s=0.0, checksum_s=0.0, commit_s=0.0, total_s=blocking_s, path="",
                   committed=False, skipped=reason, durability=NONE, copies=0)  # fmt: skip

    def raise_if_skipped(self) -> SaveResult:
        """For APIs whose callers expect a written step: a skipped save raises
        InsufficientSpaceError with the reason; otherwise returns this result."""
        if self.skipped is not None:
            raise InsufficientSpaceError(f"step {self.step} was not saved: {self.skipped}")
        return self

    @property
    def throughput_gbps(self) -> float:
        """Tensor bytes per second of total save time, in GB/s (1e9)."""
        return self.nbytes / self.total_s / 1e9 if self.total_s > 0 else float("inf")


class SaveHandle:
    """The pending result of ``CheckpointManager.save`` (and of every API that saves).

    Durability: ``durability`` is the tier the step has reached (``"none"`` until it is
    committed, and for a save skipped or failed); ``wait_for(tier)`` and
    ``on_tier(tier, fn)`` wait and call back. ``durability`` is the engine's record of the
    step; without one (a handle made from a result alone) the result's tier is final.
    """

    def __init__(
        self,
        step: int,
        future: concurrent.futures.Future[SaveResult],
        durability: StepDurability | None = None,
    ) -> None:
        self.step = step
        self._future = future
        self._durability = durability if durability is not None else StepDurability(step)
        self._own = durability is None
        future.add_done_callback(self._settle)

    def _settle(self, fut: concurrent.futures.Future[SaveResult]) -> None:
        """When the save ends: a failed or skipped save never reaches a tier; a handle
        without the engine's record takes the result's tier as final."""
        d = self._durability
        result = None if fut.cancelled() or fut.exception() is not None else fut.result()
        if result is None or result.skipped is not None or not result.committed:
            d.close()
        elif self._own:
            if result.durability != NONE:
                d.reach(result.durability, copies=result.copies)
            d.close()

    @property
    def durability(self) -> str:
        """The tier the step has reached now: ``none``, ``local``, ``replicated`` or
        ``persisted`` (``memckpt.storage.durability``)."""
        return self._durability.tier

    @property
    def copies(self) -> int:
        """Copies of every rank's data on distinct nodes when the step committed (0 before)."""
        return self._durability.copies

    @property
    def persisted_to(self) -> str | None:
        """Where the step was persisted (directory or URL), once it is."""
        return self._durability.where

    def wait_for(self, tier: str, timeout: float | None = None) -> bool:
        """Block until the step is at least as durable as ``tier``; True when it is.

        False after ``timeout`` seconds, or at once when the step cannot reach it any
        more: the save failed or was skipped, no drain was scheduled for it (not a
        ``persist_every`` step, or no ``persist_dir``), or its drain ended without
        persisting it (failed, its circuit open, or superseded by a newer step). Never
        raises the save's error: ``wait()`` does. InvalidNameError for an unknown tier.
        """
        return self._durability.wait_for(tier, timeout)

    def on_tier(self, tier: str, callback: Callable[[SaveHandle], None]) -> None:
        """Call ``callback(handle)`` once, when the step reaches ``tier`` (or a stronger one).

        It runs on memckpt's durability-callback thread (one per process), or here, at
        once, when the step is there already; never when the step does not get there
        (see ``wait_for``). Its exceptions are logged, not raised.
        """
        self._durability.on_tier(tier, lambda: callback(self))

    def wait(self, timeout: float | None = None) -> SaveResult:
        """Block until the save is globally committed; raise its error if it failed.

        Raises TimeoutError if ``timeout`` seconds pass first (the save goes on).
        """
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"save of step {self.step} still running after {timeout}s") from None

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, fn: Callable[[SaveHandle], None]) -> None:
        """Call ``fn(handle)`` once the save is committed or failed, on the save's worker
        thread (at once, here, if it already is). ``fn``'s exceptions are logged, not raised.
        """
        self._future.add_done_callback(lambda _: fn(self))

    def exception(self) -> BaseException | None:
        """The save's error once done (None while running or on success)."""
        if not self._future.done():
            return None
        return self._future.exception()

    def __repr__(self) -> str:
        state = "running"
        if self._future.done():
            state = "failed" if self._future.exception() else "committed"
        return f"SaveHandle(step={self.step}, {state}, durability={self.durability})"
