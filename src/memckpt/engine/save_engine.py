"""The save engine: runs one rank's save transactions in order, then retention.

Call sequence of one save, on every rank::

    caller thread : flatten -> plan layout -> SaveTransaction.begin -> stage   (stage)
                    -> submit the rest                                        (commit)
    background    : finalize -> local commit -> replicate (if configured)
                    -> vote (injectable; default: gloo all-gather of ballots)
                    -> manifest -> retention -> pre-fault a spare buffer

``save`` is ``commit(stage(...))``. A framework that stages first and decides later what
to store (DCP: ``async_save`` stages, its planner runs afterwards) calls the halves
itself: ``stage`` returns a :class:`StagedSave` (the staged handle) whose ``views()``
are tensors over the staged bytes, and ``commit(staged, flat=...)`` indexes those bytes
under the framework's names without copying them again. Bytes staged by another pool
(another process, ``memckpt.engine.staging``) enter through ``adopt``. A complete object
restored from the durable tier goes back into memory through ``reseed``: the same
transaction, with nothing to stage or finalize.

One worker thread runs the background halves in save order, so every rank casts
its votes in the same order. At most one save is in flight: a new save first
waits for the previous one. A rank whose save fails still votes (no), so the
other ranks learn of it instead of timing out.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memckpt.collectives import Collectives
from memckpt.engine.handle import SaveHandle, SaveResult, StepDurability
from memckpt.engine.save_transaction import (
    Ballot,
    SaveSkipped,
    SaveTransaction,
    Vote,
    collective_vote,
)
from memckpt.engine.staging import staged_views
from memckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InsufficientSpaceError,
    MemckptError,
    as_storage_error,
)
from memckpt.ids import validate_step
from memckpt.replication.replicator import Replicator
from memckpt.storage import events
from memckpt.storage.durability import PERSISTED, REPLICATED, tier_of, write_persisted_record
from memckpt.storage.faults import fault_point
from memckpt.storage.format import DEFAULT_CHUNK_SIZE
from memckpt.storage.last_save import record_last_save
from memckpt.storage.manifest import NonFinite
from memckpt.storage.pool import Buffer, free_bytes
from memckpt.storage.retention import check_keep_last, plan_retention
from memckpt.storage.room import Room, cgroup_memory, shortfall
from memckpt.storage.safe_fs import open_regular
from memckpt.storage.statedict import FlatStateDict, flatten_state_dict
from memckpt.storage.store import CheckpointStore
from memckpt.storage.writer import ObjectLayout, StagedObject, meta_estimate, plan_layout

__all__ = ["SaveEngine", "StagedSave", "space_needed"]

log = logging.getLogger(__name__)

_KEEP_DURABILITY = 16  # records of settled steps kept (a drain may still be scheduled late)


def space_needed(state_bytes: int, keep_last: int, replicas_held: int = 0) -> int:
    """Bytes one rank needs in its tmpfs: (keep_last + 2) x (1 + replicas held) x state.

    Per copy of a state: ``keep_last`` kept steps, one save in flight, and the newest
    replicated step that retention pins beyond ``keep_last`` while newer ones are not
    replicated. Replicas of other ranks share the rank's tmpfs and pool.
    """
    return (keep_last + 2) * (1 + replicas_held) * state_bytes


@dataclass(eq=False)
class StagedSave:
    """A save staged and not yet committed: pass it to :meth:`SaveEngine.commit`.

    ``handle`` is already set when the save was decided at staging (skipped for lack of
    room, or failed): committing it returns that handle.
    """

    step: int
    t0: float
    blocking_s: float = 0.0
    txn: SaveTransaction | None = None
    handle: SaveHandle | None = None

    @property
    def staged(self) -> StagedObject | None:
        return self.txn.staged if self.txn is not None else None

    def views(self) -> list[torch.Tensor]:
        """CPU tensors over the staged bytes, one per staged tensor (empty if none staged).

        They stay valid until the save is committed and retired; do not write into them.
        """
        staged = self.staged
        return staged_views(staged) if staged is not None else []

    def cuda_events(self) -> list[Any]:
        """Events that mark the end of the device-to-host copies (none for CPU tensors)."""
        staged = self.staged
        return list(staged.cuda_events) if staged is not None else []


class SaveEngine:
    """Runs saves for one rank against its store; see the module docstring for the sequence.

    Args:
        vote: how completion is decided (default: all-gather on ``collectives``).
        world_size: ranks that save each step (default: ``collectives.world_size``).
    """

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
        vote: Vote | None = None,
    ) -> None:
        check_keep_last(keep_last)
        self.store = store
        self.coll = collectives
        self.vote: Vote = vote or collective_vote(collectives)
        self.world_size = collectives.world_size
        self.keep_last = keep_last
        self.chunk_size = chunk_size
        self.durable = durable
        self.prefault = prefault
        self.replicator = replicator
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"memckpt-save-r{store.rank}"
        )
        self._layout: ObjectLayout | None = None
        self._last: concurrent.futures.Future[Any] | None = None
        self._lock = threading.Lock()
        self._committed = store.committed_steps()
        self._replicated: int | None = None  # newest step every rank replicated
        # steps found at start: a first save that is older abandons them (until a load says)
        self._abandoned: set[int] = set(store.steps())
        self._draining: set[int] = set()
        self._non_finite: set[int] = set()  # committed steps saved holding NaN/Inf
        self._checked_space = False
        self.after_commit: list[Callable[[int], None]] = []
        self._closed = False
        self._pending: StagedSave | None = None  # staged, not yet committed
        self._durability: dict[int, StepDurability] = {}  # what each recent step reached
        self._expect_drain: set[int] = set()  # drains scheduled whose outcome is not known
        self._newest_persisted: int | None = None

    def _warn_if_short(self, nbytes: int) -> None:
        """Before the first save: warn when the tmpfs cannot hold what the job will keep."""
        rep = self.replicator
        copies, ranks_here = 0, 1
        if rep is not None:
            copies = len(rep.held())
            node = rep.topology.node_of[self.store.rank]
            ranks_here = sum(1 for n in rep.topology.node_of if n == node)
        need = space_needed(nbytes, self.keep_last, copies) * ranks_here
        have = free_bytes(self.store.root) + self.store.pool.owned_bytes() * ranks_here
        if need > have:
            log.warning(
                "rank %d: %s has about %.2f GB for this job on this node, but keeping %d "
                "step(s) of %.2f GB per rank (%d rank(s) here, %d replica(s) held each) needs "
                "about %.2f GB = (keep_last + 2) x (1 + replicas) x state x ranks; short by "
                "%.2f GB. Saves will fail once it fills: use a larger tmpfs or lower keep_last",
                self.store.rank, self.store.root, have / 1e9, self.keep_last, nbytes / 1e9,
                ranks_here, copies, need / 1e9, (need - have) / 1e9,
            )  # fmt: skip

    def _retire_pinned(self, step: int) -> bool:
        """Short of space: give up the pinned replicated step if newer steps are committed.

        Retention keeps the newest replicated step beyond ``keep_last``; when nothing new
        replicates (a dead peer) and space runs out, that pin would stop every later save.
        """
        with self._lock:
            pinned = self._replicated
            newest = self._committed[-self.keep_last :]
            if pinned is None or pinned in newest or not newest or pinned >= step:
                return False
            self._replicated = None
            self._committed = [s for s in self._committed if s != pinned]
        log.warning(
            "rank %d: out of space for step %d; retiring step %d, the newest replicated one "
            "(steps %s are committed here but not replicated)",
            self.store.rank, step, pinned, newest,
        )  # fmt: skip
        self.store.delete_step(pinned, self._held())
        return True

    def _held(self) -> tuple[int, ...]:
        return self.replicator.held() if self.replicator is not None else ()

    # -- caller thread -----------------------------------------------------------------
    def save(
        self,
        step: int,
        state_dict: Any,
        *,
        blocking: bool = False,
        blobs: Mapping[str, bytes] | None = None,
        flat: FlatStateDict | None = None,
        check_finite: Callable[[str], bool] | None = None,
    ) -> SaveHandle:
        """Stage ``state_dict`` (or an already flattened ``flat``) as ``step``; see the module.

        ``check_finite(name)`` picks the tensors checked for NaN/Inf (default: all).
        """
        staged = self.stage(step, state_dict, flat=flat, check_finite=check_finite,
                            hash_inline=blocking)  # fmt: skip
        return self.commit(staged, blobs=blobs, blocking=blocking)

    def stage(
        self,
        step: int,
        state_dict: Any = None,
        *,
        flat: FlatStateDict | None = None,
        check_finite: Callable[[str], bool] | None = None,
        hash_inline: bool = False,
        cuda_stream: Any = None,
    ) -> StagedSave:
        """The blocking half of a save: copy the tensors into a pool buffer (see the module).

        Waits for the save in flight first. A save staged earlier and never committed is
        abandoned (its later commit raises). ``hash_inline`` checksums CPU tensors while
        copying (for a caller that waits for the whole save anyway); CUDA tensors are
        copied asynchronously, on ``cuda_stream`` if given. Raises what makes the state
        unsavable (after voting no, so peers learn of it); a save without room, or that
        failed writing, is decided here and its outcome is on ``StagedSave.handle``.
        """
        t0 = time.perf_counter()
        step = self._start(step)
        try:
            if flat is None:
                flat = flatten_state_dict(state_dict)
        except MemckptError as e:
            self._submit_failure(step, e)  # peers are voting on this step too
            raise
        layout = plan_layout(flat, self._layout)
        self._layout = layout
        if not self._checked_space:  # the first save tells what the job will need in all
            self._checked_space = True
            self._warn_if_short(layout.data_end)
        inline = hash_inline and not any(t.is_cuda for t in flat.tensors)

        def fill(txn: SaveTransaction) -> None:
            txn.stage(flat, layout, hash_inline=inline, chunk_size=self.chunk_size,
                      check_finite=check_finite, cuda_stream=cuda_stream)  # fmt: skip

        return self._begin(step, t0, layout.data_end + meta_estimate(flat, self.chunk_size), fill)

    def adopt(
        self,
        step: int,
        staged: StagedObject,
        flat: FlatStateDict,
        *,
        check_finite: Callable[[str], bool] | None = None,
    ) -> StagedSave:
        """Begin a save of bytes another pool staged (``memckpt.engine.staging``), as ``flat``.

        ``staged`` is a borrowed buffer this save now owns: it is committed as this
        rank's object, indexed under ``flat``'s names when every tensor of ``flat`` is a
        view of it; otherwise ``flat`` is copied into a buffer of this rank's pool and the
        borrowed one is given back. Then :meth:`commit`, as for :meth:`stage`.
        """
        t0 = time.perf_counter()
        try:
            step = self._start(step)
        except BaseException:
            self.store.pool.give_back(staged.buf)
            raise

        def fill(txn: SaveTransaction) -> None:
            txn.adopt_staged(staged)
            if not txn.relabel(flat, check_finite=check_finite):
                log.debug("rank %d: step %d: not all tensors are staged views; copying",
                          self.store.rank, step)  # fmt: skip
                txn.stage(flat, plan_layout(flat, None), hash_inline=False,
                          chunk_size=self.chunk_size, check_finite=check_finite)  # fmt: skip

        out = self._begin(step, t0, staged.buf.capacity, fill, own=False)
        if out.txn is None:  # skipped or failed before the transaction took the buffer
            self.store.pool.give_back(staged.buf)
        return out

    def reseed(
        self,
        step: int,
        source: Path,
        *,
        digest: int,
        move: bool = False,
        blobs: Mapping[str, bytes] | None = None,
        non_finite: NonFinite | None = None,
    ) -> SaveHandle:
        """Put a verified copy of this rank's object of ``step`` back into memory, committed
        as a save is (a step restored from the durable tier); every rank calls it.

        With ``move`` the file ``source`` is the caller's to give (a download next to the
        tree) and becomes a pool buffer by a rename; otherwise, or on another filesystem,
        it is copied into one on the caller's thread: the only blocking part. Its header
        digest must be ``digest`` (the persisted manifest's). The rest is a save's
        background half (local commit, replication, vote, manifest, retention) without the
        after-commit hooks: the step is persisted already. Without room it is skipped, as
        a save is; the handle tells.
        """
        t0 = time.perf_counter()
        step = self._start(step)
        try:
            size = os.lstat(source).st_size
        except OSError as e:  # vote no all the same: the other ranks are voting on it
            err = as_storage_error(e, f"rank {self.store.rank}: re-seed of step {step}")
            return SaveHandle(step, self._submit_failure(step, err))
        moved: Buffer | None = None
        if move:
            try:
                moved = self.store.pool.adopt_file(source)
            except OSError as e:  # another filesystem, or over limit_bytes: copy it instead
                log.debug("rank %d: copying %s instead of moving it: %s", self.store.rank,
                          source, e)  # fmt: skip

        def fill(txn: SaveTransaction) -> None:
            buf = moved if moved is not None else self._copy_in(source, size)
            if txn.adopt_object(buf, non_finite).digest != digest:
                raise CorruptCheckpointError(
                    f"{source}: not the object the persisted manifest of step {step} names"
                )

        staged = self._begin(step, t0, size, fill, own=moved is None)
        if staged.txn is None and moved is not None:  # skipped before the transaction took it
            self.store.pool.discard(moved)
        return self.commit(staged, blobs=blobs)

    def _copy_in(self, source: Path, size: int) -> Buffer:
        """A pool buffer holding the first ``size`` bytes of the file ``source``."""
        pool = self.store.pool
        buf = pool.acquire_sparse(size)
        try:
            pool.reserve(buf, 0, size)
            fd = open_regular(source, "object")
            if fd is None:
                raise CheckpointNotFoundError(f"{source}: gone before it was copied into memory")
            try:
                view, off = buf.memoryview(), 0
                while off < size:
                    n = os.preadv(fd, [view[off : min(size, off + (64 << 20))]], off)
                    if n == 0:
                        raise CorruptCheckpointError(f"{source}: shorter than {size} bytes")
                    off += n
            finally:
                os.close(fd)
        except BaseException:
            pool.discard(buf)
            raise
        return buf

    def pending(self, step: int) -> StagedSave | None:
        """The save of ``step`` staged and not committed yet, if there is one."""
        with self._lock:
            staged = self._pending
        return staged if staged is not None and staged.step == step else None

    def _start(self, step: int) -> int:
        if self._closed:
            raise MemckptError("save() after close()")
        step = validate_step(step)
        self.wait_idle()
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and pending.txn is not None:
            log.warning("rank %d: step %d was staged but never committed; abandoning it",
                        self.store.rank, pending.step)  # fmt: skip
            pending.txn.rollback()
        return step

    def _begin(
        self, step: int, t0: float, size: int, fill: Callable[[SaveTransaction], None],
        own: bool = True,
    ) -> StagedSave:  # fmt: skip
        """Admission, then a transaction filled by ``fill`` (the staging copy, or an adoption)."""
        reason = self._no_room(size, own)
        if reason is not None and self._retire_pinned(step):  # its buffers are free now
            reason = self._no_room(size, own)
        if reason is not None:
            log.warning("rank %d: skipping the save of step %d (training goes on): it %s",
                        self.store.rank, step, reason)  # fmt: skip
            handle = SaveHandle(step, self._submit_skip(step, reason, None, t0))
            return StagedSave(step, t0, handle=handle)
        txn: SaveTransaction | None = None
        try:
            txn = SaveTransaction(self.store, step, held=self._held())
            try:
                fill(txn)
            except InsufficientSpaceError:
                if not self._retire_pinned(step):
                    raise
                fill(txn)
        except InsufficientSpaceError as e:  # the space went while staging: skip, as above
            log.warning("rank %d: skipping the save of step %d (training goes on): %s",
                        self.store.rank, step, e)  # fmt: skip
            handle = SaveHandle(step, self._submit_skip(step, str(e), txn, t0))
            return StagedSave(step, t0, txn=txn, handle=handle)
        except OSError as e:
            err = as_storage_error(e, f"rank {self.store.rank}: save of step {step}")
            log.error("rank %d: save of step %d failed: %s", self.store.rank, step, err)
            handle = SaveHandle(step, self._submit_failure(step, err, txn))
            return StagedSave(step, t0, txn=txn, handle=handle)
        except BaseException as e:
            self._submit_failure(step, e, txn)
            raise
        staged = StagedSave(step, t0, time.perf_counter() - t0, txn)
        with self._lock:
            self._pending = staged
        return staged

    def commit(
        self,
        staged: StagedSave,
        *,
        blobs: Mapping[str, bytes] | None = None,
        blocking: bool = False,
        flat: FlatStateDict | None = None,
        check_finite: Callable[[str], bool] | None = None,
    ) -> SaveHandle:
        """The rest of a staged save, in the background; ``blocking`` waits for it.

        ``flat`` names what to store when it is not what was staged: its tensors should
        be views of the staged bytes (``staged.views()`` or views of those), which are
        then indexed in place; any that is not is copied, with the rest, into a new buffer.
        """
        if staged.handle is not None:  # decided while staging (skipped or failed)
            return staged.handle
        with self._lock:
            mine = self._pending is staged
            if mine:
                self._pending = None
        txn = staged.txn
        if not mine or txn is None or txn.buf is None:
            raise MemckptError(
                f"rank {self.store.rank}: step {staged.step} was staged but a later save was "
                "staged before it was committed, so it was abandoned; wait for each save "
                "before staging the next"
            )
        if flat is not None and not txn.relabel(flat, check_finite=check_finite):
            log.debug("rank %d: step %d: not all tensors are staged views; copying",
                      self.store.rank, staged.step)  # fmt: skip
            try:
                txn.stage(flat, plan_layout(flat, None), hash_inline=False,
                          chunk_size=self.chunk_size, check_finite=check_finite)  # fmt: skip
            except OSError as e:  # InsufficientSpaceError included: the step fails
                err = as_storage_error(e, f"rank {self.store.rank}: save of step {staged.step}")
                staged.handle = SaveHandle(staged.step,
                                           self._submit_failure(staged.step, err, txn))  # fmt: skip
                return staged.handle
            except BaseException as e:
                self._submit_failure(staged.step, e, txn)
                raise
        durability = self._track(staged.step)  # before the worker can reach a tier
        fut = self._executor.submit(self._finish, txn, staged.t0, staged.blocking_s, blocking,
                                    blobs)  # fmt: skip
        fut.add_done_callback(functools.partial(self._record_last, staged.step))
        self._last = fut
        handle = staged.handle = SaveHandle(staged.step, fut, durability)
        if blocking:
            handle.wait()
        return handle

    def wait_idle(self) -> None:
        """Wait for the save in flight, if any (its error stays on its handle)."""
        last = self._last
        if last is not None:
            concurrent.futures.wait([last])

    def _no_room(self, size: int, own: bool = True) -> str | None:
        """Why a save of an object of ``size`` bytes would not fit now (None: it fits).

        Counts what it newly allocates: its own buffer (unless ``own`` is False: it was
        staged already) and the replicas this rank will receive, less the free pool
        buffers it reuses; checks tmpfs free space, the memory cgroup's headroom and
        ``limit_bytes`` (``memckpt.storage.room``).
        """
        pool = self.store.pool
        reusable = pool.free_capacity()
        need = max(0, (int(own) + len(self._held())) * size - reusable)
        if need == 0:
            return None
        limit_left = None
        if pool.limit_bytes is not None:
            limit_left = max(0, pool.limit_bytes - pool.owned_bytes())
        room = Room(need, free_bytes(self.store.root), str(self.store.root), cgroup_memory(),
                    limit_left)  # fmt: skip
        return shortfall(room)

    def _submit_skip(
        self, step: int, reason: str, txn: SaveTransaction | None, t0: float
    ) -> concurrent.futures.Future[SaveResult]:
        blocking_s = time.perf_counter() - t0

        def skip() -> SaveResult:
            if txn is not None:
                txn.skip(self.vote, reason)
            else:
                try:
                    self.vote(step, Ballot(self.store.rank, False, reason, skipped=True))
                finally:
                    self.store.rollback(step, self._held())
            events.emit("skipped", step=step, rank=self.store.rank, job=self.store.job_id,
                        reason=reason, own=True)  # fmt: skip
            return SaveResult.skip(step, f"rank {self.store.rank} {reason}", blocking_s)

        fut = self._executor.submit(skip)
        fut.add_done_callback(functools.partial(self._record_last, step))
        self._last = fut
        return fut

    def _submit_failure(
        self, step: int, error: BaseException, txn: SaveTransaction | None = None
    ) -> concurrent.futures.Future[SaveResult]:
        fut = self._executor.submit(self._vote_failure, step, error, txn)
        fut.add_done_callback(functools.partial(self._record_last, step))
        self._last = fut
        return fut

    def _record_last(self, step: int, fut: concurrent.futures.Future[SaveResult]) -> None:
        """This rank's last save, for ``memckpt status`` (``memckpt.storage.last_save``)."""
        layout, rank = self.store.layout, self.store.rank
        try:
            r = fut.result()
        except BaseException as e:
            record_last_save(layout, rank, step, "failed", reason=f"{type(e).__name__}: {e}")
            return
        outcome = "skipped" if r.skipped else "committed" if r.committed else "failed"
        record_last_save(layout, rank, r.step, outcome, reason=r.skipped, nbytes=r.nbytes,
                         blocking_s=r.blocking_s, total_s=r.total_s,
                         replication_bytes=r.replication_bytes,
                         replication_s=r.replication_s)  # fmt: skip

    # -- background thread -------------------------------------------------------------
    def _vote_failure(
        self, step: int, error: BaseException, txn: SaveTransaction | None
    ) -> SaveResult:
        if txn is not None:
            txn.fail(self.vote, error)
        else:  # failed before it began: vote no, drop replicas pushed to us for this step
            try:
                self.vote(step, Ballot(self.store.rank, False, f"{type(error).__name__}: {error}"))
            finally:
                self.store.rollback(step, self._held())
        raise error.with_traceback(None)

    def _finish(
        self,
        txn: SaveTransaction,
        t0: float,
        blocking_s: float,
        blocking: bool,
        blobs: Mapping[str, bytes] | None,
    ) -> SaveResult:
        store, rank, step = self.store, self.store.rank, txn.step
        try:
            txn.finalize(self.world_size, durable=self.durable)
            txn.commit_local()
        except OSError as e:  # every I/O error reaches the handle as a MemckptError
            err = as_storage_error(e, f"rank {rank}: save of step {step}")
            log.error("rank %d: save of step %d failed: %s", rank, step, err)
            txn.fail(self.vote, err)
            raise err from e
        except BaseException as e:
            log.error("rank %d: save of step %d failed: %s", rank, step, e)
            txn.fail(self.vote, e)
            raise
        txn.replicate(self.replicator)
        t_vote = time.perf_counter()
        try:
            manifest, replicated = txn.complete(self.vote, blobs)
        except SaveSkipped as e:  # another rank had no room: every rank skips the step
            log.warning("rank %d: step %d skipped: %s", rank, step, e)
            events.emit("skipped", step=step, rank=rank, job=store.job_id, reason=str(e),
                        own=False)  # fmt: skip
            return SaveResult.skip(step, str(e), blocking_s)
        except OSError as e:  # after the vote: writing this node's manifest failed
            err = as_storage_error(
                e, f"rank {rank}: step {step} was committed by the vote but this node could "
                "not record its manifest (the copies on other nodes stay loadable)"
            )  # fmt: skip
            log.error("%s", err)
            raise err from e
        commit_s = time.perf_counter() - t_vote
        with self._lock:
            self._committed = sorted({s for s in self._committed if s < step} | {step})
            if replicated:
                self._replicated = max(step, self._replicated or step)
            if manifest.finite:
                self._non_finite.discard(step)
            else:
                self._non_finite.add(step)
        copies = self._reach_commit_tier(step, replicated)
        if not manifest.finite:
            log.warning("rank %d: step %d was saved holding NaN/Inf (%s); it is kept, but "
                        "recovery passes over it unless on_non_finite='load'", rank, step,
                        manifest.non_finite_summary())  # fmt: skip
        try:
            self._retain(step)
        except (OSError, MemckptError) as e:  # the step is committed: retention tries again
            log.warning("rank %d: step %d committed; removing older steps failed: %s",
                        rank, step, e)  # fmt: skip
        if not txn.restored:  # a re-seeded step is persisted already: no drain
            for hook in self.after_commit:
                hook(step)
        durability = self._drain_decided(step, copies)
        total_s = time.perf_counter() - t0
        result = SaveResult(
            step=step,
            blocking_s=total_s if blocking else blocking_s,
            commit_s=commit_s,
            total_s=total_s,
            replicated=replicated,
            durability=durability,
            copies=copies,
            **txn.result_fields(),
        )
        log.info(
            "rank %d: step %d %s (%.1f MB, blocking %.3fs, total %.3fs)",
            rank,
            step,
            "re-seeded into the memory tier" if txn.restored else "committed",
            result.nbytes / 1e6,
            result.blocking_s,
            total_s,
        )
        if not txn.restored:
            events.emit("saved", step=step, rank=rank, job=store.job_id,
                        blocking_s=result.blocking_s,
                        background_s=result.total_s - result.blocking_s,
                        nbytes=result.nbytes, replicated=replicated)  # fmt: skip
            if not manifest.finite:
                events.emit("non_finite", step=step, rank=rank, job=store.job_id,
                            tensors=list(result.non_finite))  # fmt: skip
        if self.prefault and not self._closed and txn.staged is not None \
                and not txn.staged.buf.borrowed:  # fmt: skip
            # after the result, so neither the handle nor the caller waits for it
            self._executor.submit(store.pool.prefault, txn.staged.buf.capacity)
        return result

    def _retain(self, newest: int) -> None:
        """Apply the retention policy after ``newest`` is globally committed."""
        with self._lock:
            plan = plan_retention(
                self.store.steps(),
                self._committed,
                keep_last=self.keep_last,
                newest=newest,
                replicated=self._replicated,
                draining=self._draining,
                abandoned=self._abandoned,
                non_finite=self._non_finite,
            )
            self._committed = [s for s in self._committed if s in plan.keep]
            self._abandoned = set()
        held = self._held()
        for s in plan.delete:
            self.store.delete_step(s, held)
            fault_point("mid_retention", newest)

    def note_loaded(self, step: int, *, replicated: bool) -> None:
        """After a load of ``step``: it is committed; newer steps here are abandoned."""
        with self._lock:
            self._committed = sorted({s for s in self._committed if s < step} | {step})
            if replicated:
                self._replicated = step
            self._abandoned = {s for s in self.store.steps() if s > step}

    def set_draining(self, step: int, draining: bool) -> None:
        """Keep ``step`` from retention while it is written to persistent storage.

        ``draining=True`` also says a drain of ``step`` is scheduled: its handle may reach
        ``persisted`` until the drain reports (``note_persisted`` / ``note_not_persisted``).
        """
        with self._lock:
            (self._draining.add if draining else self._draining.discard)(step)
            d = self._durability.get(step) if draining else None
            if draining:
                self._expect_drain.add(step)
        if d is not None:
            d.reopen()

    # -- durability (memckpt.engine.handle) ------------------------------------------------
    def durability(self, step: int) -> StepDurability | None:
        """What this rank knows of ``step``'s durability, for a recent save of it."""
        with self._lock:
            return self._durability.get(step)

    @property
    def newest_persisted(self) -> int | None:
        """The newest step a drain of this process reported persisted."""
        with self._lock:
            return self._newest_persisted

    def _track(self, step: int) -> StepDurability:
        d = StepDurability(step)
        with self._lock:
            old = self._durability.get(step)
            self._durability[step] = d
            # forget the oldest records that nothing can change any more
            done = sorted(s for s, x in self._durability.items() if s != step and not x.open)
            for s in done[: max(0, len(self._durability) - _KEEP_DURABILITY)]:
                del self._durability[s]
        if old is not None:
            old.close()
        return d

    def _copies(self) -> int:
        """Copies of the least-held rank's data once every push of a step succeeded: its
        own node and the distinct other nodes the replication plan puts it on."""
        rep = self.replicator
        if rep is None or not rep.pushes:
            return 1
        topo = rep.topology
        return 1 + min(
            len({topo.node(h) for h in rep.holders(r)} - {topo.node(r)})
            for r in range(len(rep.peers))
        )

    def _reach_commit_tier(self, step: int, replicated: bool) -> int:
        """At the commit: ``replicated`` when every rank's pushes succeeded (the vote says)
        and the plan keeps a copy on another node, else ``local``. Returns the copies."""
        copies = self._copies() if replicated else 1
        tier = tier_of(copies, persisted=False)
        d = self.durability(step)
        if d is not None:
            d.reach(tier, copies=copies)
        if tier == REPLICATED:
            events.emit("replicated", step=step, rank=self.store.rank, job=self.store.job_id,
                        copies=copies)  # fmt: skip
        return copies

    def _drain_decided(self, step: int, copies: int) -> str:
        """After the after-commit hooks: without a drain scheduled no higher tier comes.
        Returns the tier reached now."""
        with self._lock:
            d = self._durability.get(step)
            expected = step in self._expect_drain
        if d is None:
            return tier_of(copies, persisted=False)
        if not expected:
            d.close()
        return d.tier

    def note_persisted(self, step: int, where: str) -> None:
        """A drain verified the whole of ``step`` at ``where`` (every rank's part and the
        commit marker): its handle reaches ``persisted``, the node's tree records it
        (``memckpt.storage.durability``) and the ``persisted`` event is emitted."""
        with self._lock:
            self._expect_drain.discard(step)
            d = self._durability.get(step)
            self._newest_persisted = max(step, self._newest_persisted or step)
        try:
            m = self.store.manifest(step)
        except (OSError, MemckptError) as e:
            log.debug("rank %d: no manifest of step %d to record as persisted: %s",
                      self.store.rank, step, e)  # fmt: skip
            m = None
        if m is not None:
            write_persisted_record(self.store.root, step, m.checksum, where)
        if d is not None:
            d.reach(PERSISTED, where=where)
            d.close()
        events.emit("persisted", step=step, rank=self.store.rank, job=self.store.job_id,
                    where=where)  # fmt: skip

    def note_not_persisted(self, step: int, why: str) -> None:
        """The drain of ``step`` ended without persisting it (failed, skipped, superseded,
        or its outcome cannot be known): its handle will not reach ``persisted``."""
        with self._lock:
            self._expect_drain.discard(step)
            d = self._durability.get(step)
        log.debug("rank %d: step %d not persisted: %s", self.store.rank, step, why)
        if d is not None:
            d.close()

    def submit_background(
        self, fn: Callable[..., Any], *args: Any
    ) -> concurrent.futures.Future[Any]:
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
