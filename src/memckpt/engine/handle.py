"""What a save returns: a handle to wait on, and the result with its timings."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass

from memckpt.errors import InsufficientSpaceError

__all__ = ["SaveHandle", "SaveResult"]


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

    @classmethod
    def skip(cls, step: int, reason: str, blocking_s: float = 0.0) -> SaveResult:
        """The result of a save that did not fit and was skipped: nothing was written."""
        return cls(step=step, nbytes=0, file_bytes=0, num_tensors=0, blocking_s=blocking_s,
                   stage_s=0.0, checksum_s=0.0, commit_s=0.0, total_s=blocking_s, path="",
                   committed=False, skipped=reason)  # fmt: skip

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
    """The pending result of ``CheckpointManager.save``."""

    def __init__(self, step: int, future: concurrent.futures.Future[SaveResult]) -> None:
        self.step = step
        self._future = future

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
        return f"SaveHandle(step={self.step}, {state})"
