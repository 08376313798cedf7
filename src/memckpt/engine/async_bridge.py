"""The bridge between one engine save and a framework's async request (NVRx, Megatron).

Frameworks schedule an async save as a request with an ``async_fn`` that a forked worker
runs and finalize functions the training process runs later. The engine's save runs in
this process's background thread, so the request's ``async_fn`` only waits on the
save's ``DoneSignal`` (a file a forked worker can see), and its finalize raises the
save's outcome on every rank::

    bridge = bridge_async_save(runtime, step, lambda: runtime.engine.save(...), after=hook)
    request = FrameworkAsyncRequest(bridge.signal, (), [bridge.finalize])

``after(handle)`` runs on the engine's thread when the save ends, before the signal is
set (Megatron writes its ``common.pt`` there); its error is raised by ``finalize``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from memckpt.engine.done_signal import DoneSignal, new_signal, signal_when_done
from memckpt.engine.handle import SaveHandle, SaveResult
from memckpt.engine.runtime import NodeRuntime
from memckpt.errors import MemckptError

__all__ = ["AsyncSaveBridge", "bridge_async_save"]

log = logging.getLogger(__name__)


@dataclass
class AsyncSaveBridge:
    """One save as a framework request sees it: a signal to wait on, a finalize to call."""

    signal: DoneSignal
    handle: SaveHandle
    timeout_s: float
    step: int
    rank: int
    errors: list[BaseException] = field(default_factory=list)

    def finalize(self) -> SaveResult:
        """Wait for the save and raise its error (or the ``after`` hook's); clears the signal."""
        try:
            result = self.handle.wait(self.timeout_s)
            self.signal.wait()  # the hook's work is done just before it is set
            result.raise_if_skipped()  # a framework's request failed when nothing was saved
            if self.errors:
                raise MemckptError(
                    f"rank {self.rank}: step {self.step} committed, but the work after it "
                    f"failed: {self.errors[0]}"
                ) from self.errors[0]
            return result
        finally:
            self.signal.clear()


def bridge_async_save(
    runtime: NodeRuntime,
    step: int,
    start: Callable[[], SaveHandle],
    *,
    after: Callable[[SaveHandle], None] | None = None,
) -> AsyncSaveBridge:
    """Start a save with ``start()`` and bridge it to a framework request (see the module)."""
    timeout_s = 3 * runtime.options.timeout_s + 60
    signal = new_signal(runtime.store.layout, runtime.rank, step, timeout_s)
    handle = start()
    bridge = AsyncSaveBridge(signal, handle, timeout_s, step, runtime.rank)

    def hook(h: SaveHandle) -> None:
        if after is None or h.exception() is not None or h.wait().skipped is not None:
            return  # nothing was committed: no work after it
        try:
            after(h)
        except BaseException as e:  # raised by finalize, on this rank
            bridge.errors.append(e)

    signal_when_done(handle, signal, before=hook)
    return bridge
