"""Asynchronous saves in the shape of NVRx's ``async_ckpt.core``: a request and a queue.

``LocalCheckpointManager.save(..., is_async=True)`` stages the tensors and returns an
:class:`AsyncRequest`; memckpt's save engine commits it in a background thread. The
request fits NVRx's ``AsyncCallsQueue`` (same fields and methods) and this module's
:class:`AsyncCallsQueue`, which has the same methods and needs no NVRx.

How a request tells a queue that the save is done: its ``async_fn`` is the engine's
:class:`memckpt.engine.done_signal.DoneSignal`, which waits for a file the engine creates
once the save has finished (committed or failed). NVRx's queue (``persistent=False``,
as NVRx requires for local checkpoints) runs it in a forked child and sees the save done
when that child ends; this module's queue asks ``DoneSignal.is_set()``. Either way the
finalize functions then run on the caller's thread: the first one raises the save's
error, if any.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from memckpt.engine.done_signal import DoneSignal
from memckpt.errors import UsageError

__all__ = ["AsyncCallsQueue", "AsyncRequest"]

log = logging.getLogger(__name__)

_POLL_S = 0.005


def _agree(value: int, op: str) -> int:
    """All-reduce one integer over the default process group (a world of one: itself)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device: Any = "cpu"
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return int(t.item())


class AsyncRequest(NamedTuple):
    """An asynchronous save to schedule on a queue; the fields of NVRx's ``AsyncRequest``.

    ``finalize_fns`` run on the caller's thread after ``async_fn`` is done on every rank.
    """

    async_fn: Callable[..., Any] | None
    async_fn_args: tuple[Any, ...]
    finalize_fns: list[Callable[[], Any]]
    async_fn_kwargs: dict[str, Any] = {}
    preload_fn: Callable[[], Any] | None = None
    is_frozen: bool = False
    call_idx: int = 0

    def add_finalize_fn(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` after the existing finalize functions."""
        if self.is_frozen:
            raise UsageError("cannot add finalize functions to a frozen AsyncRequest")
        self.finalize_fns.append(fn)

    def freeze(self) -> AsyncRequest:
        return self._replace(is_frozen=True)

    def execute_sync(self) -> None:
        """Run the request to the end on this thread (every rank calls it)."""
        if self.async_fn is not None:
            self.async_fn(*self.async_fn_args, **self.async_fn_kwargs)
        self.execute_finalize_fns(validate_matching_call_idx=False)

    def execute_finalize_fns(self, validate_matching_call_idx: bool = True) -> int:
        """Run the finalize functions; with validation, check every rank is at this call."""
        for fn in self.finalize_fns:
            fn()
        if validate_matching_call_idx and _agree(self.call_idx, "max") != self.call_idx:
            raise UsageError(
                f"async call {self.call_idx} finalized while another rank finalizes a later "
                "one: every rank must schedule and finalize the same requests"
            )
        return self.call_idx


class _Active(NamedTuple):
    idx: int
    request: AsyncRequest
    done: Callable[[], bool]


class AsyncCallsQueue:
    """A queue of asynchronous saves with NVRx's ``AsyncCallsQueue`` methods, without NVRx.

    No process is started: a memckpt request's save already runs in the engine's
    background thread; any other request's ``async_fn`` runs in a thread here.
    ``schedule_async_request`` and ``maybe_finalize_async_calls`` are called by every
    rank; unless ``no_dist``, ranks agree (one all-reduce on the default process group)
    on which calls are done, so they finalize the same ones.
    """

    def __init__(self, persistent: bool = False) -> None:
        self.persistent = persistent  # accepted for NVRx compatibility; nothing persists here
        self.call_idx = -1
        self._calls: deque[_Active] = deque()

    def schedule_async_request(self, async_request: AsyncRequest) -> int:
        """Start tracking ``async_request``; returns its call index."""
        self.call_idx += 1
        req = AsyncRequest(*async_request).freeze()
        req = req._replace(call_idx=self.call_idx)
        fn = req.async_fn
        if isinstance(fn, DoneSignal):
            done = fn.is_set
        elif fn is None:

            def done() -> bool:
                return True
        else:
            thread = threading.Thread(
                target=fn, args=req.async_fn_args, kwargs=req.async_fn_kwargs,
                name=f"memckpt-async-call-{self.call_idx}", daemon=True,
            )  # fmt: skip
            thread.start()

            def done() -> bool:
                return not thread.is_alive()

        self._calls.append(_Active(self.call_idx, req, done))
        return self.call_idx

    def maybe_finalize_async_calls(
        self, blocking: bool = False, no_dist: bool = False
    ) -> list[int]:
        """Finalize the calls done on every rank, oldest first; returns their indices.

        With ``blocking`` it waits for every scheduled call. A failed save raises its
        error from here (later calls stay queued).
        """
        finalized: list[int] = []
        while self._calls:
            head = self._calls[0]
            if blocking:
                while not head.done():
                    time.sleep(_POLL_S)
            pending = 0 if head.done() else 1
            if not no_dist:
                pending = _agree(pending, "sum")
            if pending:
                break
            self._calls.popleft()
            finalized.append(head.request.execute_finalize_fns(not no_dist))
        return finalized

    def get_num_unfinalized_calls(self) -> int:
        return len(self._calls)

    def close(self) -> None:
        """Finalize every scheduled call (blocking)."""
        self.maybe_finalize_async_calls(blocking=True)
