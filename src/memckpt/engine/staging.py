"""Stage now, commit later: the staged handle, views of staged bytes, and staging for a
committer in another process.

Every save copies its tensors once, into a pool buffer (:func:`stage_into`, used by the
save transaction and by :class:`StagingArea`); everything after that copy runs in the
background. Between the two halves the staged bytes can be lent out as *views*
(:func:`staged_views`: tensors over the buffer's mapping), for code that decides what
to store (DCP's planner). A view made for another process pickles as a handle to the
buffer (its path and inode, and the view's offset, dtype and shape), never as its bytes;
the receiving process maps the same tmpfs file (:func:`open_borrowed`), so no byte is
copied on the way.

Call sequence when another process commits (DCP's async_save with its process executor):

    training process    area = StagingArea.open(job_layout, rank) # a pool; no runtime
                        staged = area.stage(flat)                # the only blocking part
                        views = staged.views()  -> DCP pickles them to its daemon; the
                        first view pickled hands the buffer over (BufferPool.hand_over)
    committing process  the views unpickle as views of a borrowed mapping
                        imported = find_staged(tensors)          # the borrowed buffer
                        engine.adopt(step, imported, flat) -> engine.commit(...)
                        retention later closes it and renames it back into .pool/
    training process    a later area.stage() takes it back, still mapped
                        (BufferPool._reclaim_returned)

The same handle works in one process (the committer borrows by path all the same).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memckpt.errors import MemckptError
from memckpt.ids import JobLayout
from memckpt.storage.format import DEFAULT_CHUNK_SIZE, dtype_from_name, dtype_name
from memckpt.storage.pool import Buffer, BufferPool, open_borrowed, return_borrowed
from memckpt.storage.safe_fs import ensure_job_root
from memckpt.storage.statedict import FlatStateDict
from memckpt.storage.tensorbytes import typed_view
from memckpt.storage.writer import ObjectLayout, StagedObject, meta_estimate, plan_layout, stage

__all__ = [
    "StagedRef",
    "StagedView",
    "StagingArea",
    "find_staged",
    "side_stream",
    "stage_into",
    "staged_views",
]

log = logging.getLogger(__name__)


def stage_into(
    pool: BufferPool,
    flat: FlatStateDict,
    layout: ObjectLayout,
    *,
    hash_inline: bool,
    chunk_size: int,
    step: int = -1,
    cuda_stream: Any = None,
) -> StagedObject:
    """Acquire a buffer for ``flat`` and copy its tensors into it: the one staging copy.

    The buffer goes back to the pool if the copy fails. Raises InsufficientSpaceError
    when there is no room for it.
    """
    # cold_ok: with no pre-faulted buffer, write straight into a new file (as torch.save
    # does) instead of allocating and faulting it first
    buf = pool.acquire(layout.data_end + meta_estimate(flat, chunk_size), cold_ok=True)
    try:
        return stage(flat, layout, buf, hash_inline=hash_inline, chunk_size=chunk_size,
                     step=step, cuda_stream=cuda_stream)  # fmt: skip
    except BaseException:
        pool.give_back(buf)
        raise


_streams: dict[torch.device, Any] = {}


def side_stream(device: torch.device) -> Any:  # pragma: no cover - needs CUDA
    """The stream staging copies from ``device`` run on (one per device, made once)."""
    s = _streams.get(device)
    if s is None:
        s = _streams[device] = torch.cuda.Stream(device)
    return s


# -- views that travel as handles -------------------------------------------------------------


@dataclass(frozen=True)
class StagedRef:
    """Where a handed-over staged buffer is: what a view pickles as, with its place in it."""

    path: str
    inode: int
    data_end: int
    chunk_size: int


class _Handoff:
    """The owner's side of one staged buffer: hands it over once, on first pickling."""

    def __init__(self, pool: BufferPool, staged: StagedObject) -> None:
        self.pool = pool
        self.staged = staged
        self._ref: StagedRef | None = None
        self._lock = threading.Lock()

    def hand_over(self) -> StagedRef:
        with self._lock:
            if self._ref is None:
                for ev in self.staged.cuda_events:  # pragma: no cover - needs CUDA
                    ev.synchronize()  # the other process reads these bytes at once
                buf = self.staged.buf
                self.pool.hand_over(buf)
                end, chunk = self.staged.layout.data_end, self.staged.chunk_size
                self._ref = StagedRef(str(buf.path), os.fstat(buf.fd).st_ino, end, chunk)
            return self._ref

    def holds_any(self, ptrs: Iterable[int]) -> bool:
        buf = self.staged.buf
        if buf.mapping is None:
            return False
        lo = buf.tensor.data_ptr()
        hi = lo + self.staged.layout.data_end
        return any(lo <= p < hi for p in ptrs)


class StagedView(torch.Tensor):
    """A tensor over staged bytes that pickles as a handle to its buffer, not as its bytes.

    Operations on it return plain tensors (views of the same bytes where torch makes
    views); only pickling differs.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl
    _memckpt_handoff: _Handoff
    _memckpt_offset: int

    def __reduce_ex__(self, protocol: Any) -> tuple[Callable[..., torch.Tensor], tuple[Any, ...]]:
        ref = self._memckpt_handoff.hand_over()
        return (_rebuild_view, (ref, self._memckpt_offset, dtype_name(self.dtype),
                                tuple(self.shape)))  # fmt: skip


def staged_views(staged: StagedObject, handoff: _Handoff | None = None) -> list[torch.Tensor]:
    """One CPU tensor over the staged bytes of each staged tensor, in ``flat`` order.

    With ``handoff`` they are :class:`StagedView`s, which another process receives as
    views of the same file; otherwise plain tensors (pickled, they are copied).
    """
    out = []
    base = staged.buf.tensor
    for off, n, dt, shape in zip(staged.layout.offsets, staged.layout.nbytes, staged.dtypes,
                                 staged.shapes):  # fmt: skip
        v = typed_view(base, off, n, dtype_from_name(dt), shape)
        if handoff is not None:
            v = torch.Tensor._make_subclass(StagedView, v, False)
            v._memckpt_handoff = handoff
            v._memckpt_offset = off
        out.append(v)
    return out


# -- the committing side ----------------------------------------------------------------------

_imported_lock = threading.Lock()
_imported: dict[int, StagedObject] = {}  # inode -> a borrowed buffer, until a commit takes it


def _imported_buffer(ref: StagedRef) -> StagedObject:
    with _imported_lock:
        got = _imported.get(ref.inode)
        if got is not None and got.buf.fd >= 0 and str(got.buf.path) == ref.path:
            return got
        buf = open_borrowed(Path(ref.path), ref.inode)
        got = _imported[ref.inode] = _bare_staged(buf, ref.data_end, ref.chunk_size)
        return got


def _bare_staged(buf: Buffer, data_end: int, chunk_size: int) -> StagedObject:
    """A staged object that says only where its bytes end (``relabel`` names the rest)."""
    return StagedObject(buf=buf, layout=ObjectLayout((), (), (), data_end), flat_names=[],
                        dtypes=[], shapes=[], devices=[], requires_grad=[], is_parameter=[],
                        skeleton=b"", chunk_size=chunk_size)  # fmt: skip


def _rebuild_view(ref: StagedRef, offset: int, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Unpickling a :class:`StagedView` in the committing process: a view of the same file."""
    staged = _imported_buffer(ref)
    dt = dtype_from_name(dtype)
    n = dt.itemsize
    for s in shape:
        n *= s
    if offset < 0 or offset + n > ref.data_end:
        raise MemckptError(f"{ref.path}: a staged view reaches outside the staged bytes")
    return typed_view(staged.buf.tensor, offset, n, dt, shape)


def find_staged(tensors: list[torch.Tensor]) -> StagedObject | None:
    """The borrowed staged buffer that holds any of ``tensors``, taken for a commit; or None.

    Looks at buffers whose views arrived from another process (any other such buffer
    belonged to a save that failed before its commit: it is given back), then at buffers
    staged by a :class:`StagingArea` of this process, borrowed from it by path all the
    same. The caller owns the result: commit it, or give it back (``return_borrowed``).
    """
    ptrs = [t.data_ptr() for t in tensors if t.numel()]
    if not ptrs:
        return None
    found = None
    with _imported_lock:
        for ino, st in list(_imported.items()):
            lo = st.buf.tensor.data_ptr() if st.buf.mapping is not None else 0
            if lo and any(lo <= p < lo + st.layout.data_end for p in ptrs):
                found = _imported.pop(ino)
                break
        stale = list(_imported.values()) if found is not None else []
        if found is not None:
            _imported.clear()
    for st in stale:
        return_borrowed(st.buf)
    if found is not None:
        return found
    for area in StagingArea.all():
        handoff = area.holding(ptrs)
        if handoff is not None:
            ref = handoff.hand_over()
            return _bare_staged(open_borrowed(Path(ref.path), ref.inode), ref.data_end,
                                ref.chunk_size)  # fmt: skip
    return None


def drop_imported() -> None:
    """Give back every borrowed buffer no commit took (a save that failed before it)."""
    with _imported_lock:
        left = list(_imported.values())
        _imported.clear()
    for st in left:
        return_borrowed(st.buf)


# -- the staging side, where no runtime is open -------------------------------------------------


class StagingArea:
    """One rank's staging pool in a process that stages but does not commit (see the module).

    Opened once per (job root, rank) and process (:meth:`open`), closed at exit or by
    :meth:`close_all`. Not collective.
    """

    _lock = threading.Lock()
    _open: dict[tuple[str, int], StagingArea] = {}

    def __init__(self, layout: JobLayout, rank: int, limit_bytes: int | None) -> None:
        root, pool_dir = layout.root, layout.pool_dir
        ensure_job_root(root)
        self.root = root
        self.rank = rank
        self.pool = BufferPool(pool_dir, rank, limit_bytes)
        self._layout: ObjectLayout | None = None
        self._recent: weakref.WeakSet[_Handoff] = weakref.WeakSet()
        self._last: _Handoff | None = None

    @classmethod
    def open(cls, layout: JobLayout, rank: int, limit_bytes: int | None = None) -> StagingArea:
        """The job's staging area of ``rank`` in this process (made the first time)."""
        key = (os.path.realpath(layout.root), rank)
        with cls._lock:
            area = cls._open.get(key)
            if area is None:
                area = cls._open[key] = cls(layout, rank, limit_bytes)
            return area

    @classmethod
    def all(cls) -> list[StagingArea]:
        with cls._lock:
            return list(cls._open.values())

    @classmethod
    def close_all(cls, root: str | os.PathLike[str] | None = None) -> None:
        """Close the staging areas of this process (all, or those of one job root)."""
        want = None if root is None else os.path.realpath(root)
        with cls._lock:
            keys = [k for k in cls._open if want is None or k[0] == want]
            areas = [cls._open.pop(k) for k in keys]
        for area in areas:
            area.pool.close()

    def stage(
        self, flat: FlatStateDict, *, chunk_size: int = DEFAULT_CHUNK_SIZE, cuda_stream: Any = None
    ) -> tuple[StagedObject, list[torch.Tensor]]:
        """Copy ``flat``'s tensors into a buffer of this area: (staged, views that travel).

        Raises InsufficientSpaceError when there is no room. A buffer staged by an earlier
        call and never handed over (its save failed before DCP sent it) is given back.
        """
        t0 = time.perf_counter()
        last, self._last = self._last, None
        if last is not None and last._ref is None:
            log.debug("rank %d: giving back a staged buffer no process took", self.rank)
            self.pool.give_back(last.staged.buf)
        layout = plan_layout(flat, self._layout)
        self._layout = layout
        staged = stage_into(self.pool, flat, layout, hash_inline=False, chunk_size=chunk_size,
                            cuda_stream=cuda_stream)  # fmt: skip
        handoff = _Handoff(self.pool, staged)
        self._last = handoff
        self._recent.add(handoff)
        # the next save finds a pre-faulted buffer (a no-op when one fits already)
        self.pool.prefault_in_background(staged.buf.capacity)
        log.debug("rank %d: staged %d tensors (%.1f MB) in %.3fs", self.rank, len(flat.tensors),
                  staged.layout.data_bytes / 1e6, time.perf_counter() - t0)  # fmt: skip
        return staged, staged_views(staged, handoff)

    def holding(self, ptrs: list[int]) -> _Handoff | None:
        """The handoff of a buffer of this area holding any of the addresses ``ptrs``."""
        for h in list(self._recent):
            if h.holds_any(ptrs):
                return h
        return None


atexit.register(StagingArea.close_all)
