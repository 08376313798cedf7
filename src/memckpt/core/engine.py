"""The save pipeline: stage on the caller's thread, finish in one background worker.

Call sequence of one save, on every rank::

    caller thread : flatten -> plan layout -> begin (marker) -> acquire buffer -> stage
    background    : [wait device copies] -> checksums -> skeleton, index, header
                    -> local commit (rename) -> replicate to peers (if configured)
                    -> commit vote (collective; also agrees whether every rank replicated)
                    -> .committed -> retention -> pre-fault a spare buffer

One worker thread runs the background halves in save order, so every rank issues
its commit votes in the same order. At most one save is in flight: a new save
first waits for the previous one. A rank whose save fails still votes (no), so the
other ranks learn of it instead of timing out.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from memckpt.core import events
from memckpt.core.coordination import Collectives
from memckpt.core.faults import fault_point
from memckpt.core.format import DEFAULT_CHUNK_SIZE
from memckpt.core.handle import SaveHandle, SaveResult
from memckpt.core.statedict import flatten_state_dict
from memckpt.core.store import CheckpointStore
from memckpt.core.writer import (
    ObjectLayout,
    StagedObject,
    finalize,
    meta_estimate,
    plan_layout,
    stage,
)
from memckpt.errors import CommitError, InsufficientSpaceError, MemckptError
from memckpt.ids import validate_step

if TYPE_CHECKING:
    from memckpt.replication.replicator import Replicator

__all__ = ["SaveEngine"]

log = logging.getLogger(__name__)


class SaveEngine:
    """Runs saves for one rank against its store; see the module docstring for the sequence."""

    def __init__(
        self,
        store: CheckpointStore,
        collectives: Collectives,
        *,
        keep_last: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        durable: bool = False,
        prefault: bool = True,
        replicator: Replicator | None = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.store = store
        self.coll = collectives
        self.keep_last = keep_last
        self.chunk_size = chunk_size
        self.durable = durable
        self.prefault = prefault
        self.replicator = replicator
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"memckpt-save-r{store.rank}"
        )
        self._layout: ObjectLayout | None = None
        self._last: concurrent.futures.Future[SaveResult] | None = None
        self._lock = threading.Lock()
        self._committed = [
            s
            for s in store.steps()
            if store.is_committed(s) and store.object_path(s, store.rank).exists()
        ]
        self._replicated: int | None = None  # newest step every rank replicated
        # steps found at start: a first save that is older abandons them (until a load says)
        self._abandoned: set[int] = set(store.steps())
        self._closed = False

    # -- caller thread -----------------------------------------------------------------
    def save(self, step: int, state_dict: Any, *, blocking: bool = False) -> SaveHandle:
        t0 = time.perf_counter()
        if self._closed:
            raise MemckptError("save() after close()")
        step = validate_step(step)
        self.wait_idle()
        try:
            flat = flatten_state_dict(state_dict)
        except MemckptError as e:
            self._submit_failure(step, e)  # peers are voting on this step too
            raise
        layout = plan_layout(flat, self._layout)
        self._layout = layout
        buf = None
        try:
            self.store.begin(step)
            fault_point("after_begin", step)
            buf = self.store.pool.acquire(layout.data_end + meta_estimate(flat, self.chunk_size))
            has_cuda = any(t.is_cuda for t in flat.tensors)
            staged = stage(
                flat,
                layout,
                buf,
                hash_inline=blocking and not has_cuda,
                chunk_size=self.chunk_size,
                step=step,
            )
            fault_point("after_stage", step)
        except (InsufficientSpaceError, OSError) as e:
            self.store.abort(step, buf)
            log.error("rank %d: save of step %d failed: %s", self.store.rank, step, e)
            return SaveHandle(step, self._submit_failure(step, e))
        except BaseException as e:
            self.store.abort(step, buf)
            self._submit_failure(step, e)
            raise
        blocking_s = time.perf_counter() - t0
        fut = self._executor.submit(self._finish, step, staged, t0, blocking_s, blocking)
        self._last = fut
        handle = SaveHandle(step, fut)
        if blocking:
            handle.wait()
        return handle

    def wait_idle(self) -> None:
        """Wait for the save in flight, if any (its error stays on its handle)."""
        last = self._last
        if last is not None:
            concurrent.futures.wait([last])

    def _submit_failure(
        self, step: int, error: BaseException
    ) -> concurrent.futures.Future[SaveResult]:
        fut = self._executor.submit(self._vote_failure, step, error)
        self._last = fut
        return fut

    # -- background thread -------------------------------------------------------------
    def _vote(
        self, step: int, ok: bool, message: str, replicated: bool = False
    ) -> tuple[list[tuple[int, str]], bool]:
        """All-gather (ok, why, replicated); return the failed ranks and whether all replicated."""
        votes = self.coll.all_gather_object(
            (ok, message, replicated), f"commit vote for step {step}"
        )
        failed = [(r, m) for r, (v, m, _) in enumerate(votes) if not v]
        return failed, all(rep for _, _, rep in votes)

    def _vote_failure(self, step: int, error: BaseException) -> SaveResult:
        self._vote(step, False, f"{type(error).__name__}: {error}")
        raise error

    def _drop_step(self, step: int) -> None:
        """Remove this rank's object of ``step`` and the replicas it holds for others."""
        self.store.delete_step(step)
        if self.replicator is not None:
            self.store.delete_objects(step, self.replicator.held())

    def _finish(
        self, step: int, staged: StagedObject, t0: float, blocking_s: float, blocking: bool
    ) -> SaveResult:
        store, rank = self.store, self.store.rank
        try:
            file_bytes, hash_s = finalize(
                staged,
                job_id=store.job_id,
                step=step,
                rank=rank,
                world_size=self.coll.world_size,
                durable=self.durable,
            )
            fault_point("before_local_commit", step)
            path = store.commit_local(step, staged.buf)
            fault_point("after_local_commit", step)
        except BaseException as e:
            store.abort(step, staged.buf)
            log.error("rank %d: save of step %d failed: %s", rank, step, e)
            self._vote(step, False, f"{type(e).__name__}: {e}")
            raise
        outcome = None
        if self.replicator is not None:
            outcome = self.replicator.replicate(step)
            fault_point("after_replicate", step)
        t_vote = time.perf_counter()
        failed, replicated = self._vote(step, True, "", outcome is not None and outcome.ok)
        if failed:
            self._drop_step(step)
            detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
            raise CommitError(
                f"step {step} was not committed because other ranks failed ({detail}); "
                "the previous checkpoint is kept"
            )
        fault_point("after_vote", step)
        store.mark_committed(step, self.coll.world_size)
        fault_point("after_mark_committed", step)
        commit_s = time.perf_counter() - t_vote
        if replicated:
            with self._lock:
                self._replicated = max(step, self._replicated or step)
        self._retain(step)
        total_s = time.perf_counter() - t0
        result = SaveResult(
            step=step,
            nbytes=staged.layout.data_bytes,
            file_bytes=file_bytes,
            num_tensors=len(staged.flat_names),
            blocking_s=total_s if blocking else blocking_s,
            stage_s=staged.stage_s,
            checksum_s=hash_s,
            commit_s=commit_s,
            total_s=total_s,
            path=str(path),
            replicated=replicated,
            replication_bytes=outcome.nbytes if outcome else 0,
            replication_s=outcome.seconds if outcome else 0.0,
        )
        log.info(
            "rank %d: step %d committed (%.1f MB, blocking %.3fs, total %.3fs)",
            rank,
            step,
            result.nbytes / 1e6,
            result.blocking_s,
            total_s,
        )
        events.emit("saved", step=step, rank=rank, blocking_s=result.blocking_s)
        if self.prefault and not self._closed:
            # after the result, so neither the handle nor the caller waits for it
            self._executor.submit(store.pool.prefault, staged.buf.capacity)
        return result

    def _retain(self, newest: int) -> None:
        """Keep the newest ``keep_last`` committed steps; retire this rank's other objects.

        Runs only after ``newest`` is globally committed, so the newest complete step
        is never removed before a newer one is complete; with replication the newest
        step every rank replicated is kept too, until a newer one is replicated. Steps
        after ``newest`` are removed only when they belong to a timeline abandoned by a
        restart from an older step (a newer step may be arriving from a faster peer).
        """
        with self._lock:
            self._committed = sorted({s for s in self._committed if s < newest} | {newest})
            keep = set(self._committed[-self.keep_last :])
            if self._replicated is not None and self._replicated <= newest:
                keep.add(self._replicated)
            self._committed = [s for s in self._committed if s in keep]
            abandoned, self._abandoned = self._abandoned, set()
        for s in self.store.steps():
            if s not in keep and (s < newest or s in abandoned):
                self._drop_step(s)
                fault_point("mid_retention", newest)

    def note_loaded(self, step: int, *, replicated: bool) -> None:
        """After a load of ``step``: it is committed; newer steps here are abandoned."""
        with self._lock:
            self._committed = sorted({s for s in self._committed if s < step} | {step})
            if replicated:
                self._replicated = step
            self._abandoned = {s for s in self.store.steps() if s > step}

    def submit_background(self, fn: Any, *args: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn`` on the save worker, after the save in flight; wait() waits for it."""
        fut = self._executor.submit(fn, *args)
        self._last = fut
        return fut

    def committed_steps(self) -> list[int]:
        with self._lock:
            return list(self._committed)

    def close(self) -> None:
        self._closed = True
        self.wait_idle()
        self._executor.shutdown(wait=True)
