"""Reusable, pre-faulted, mapped buffer files: the memory checkpoints are written into.

A save copies tensors into a buffer whose pages the kernel has already given us
and whose mapping stays open, so the copy runs at memory speed instead of paying
for page faults on every save. Buffers cycle: a free buffer in ``.pool/`` is
written, renamed into a step directory on commit, and renamed back into ``.pool/``
when retention retires that step; the mapping survives every rename.

Buffers are allocated with ``posix_fallocate`` before they are mapped: writing
into a mapping of a sparse file on a full tmpfs would kill the process with
SIGBUS, whereas a failed allocation is a clean ``InsufficientSpaceError``.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memckpt.errors import InsufficientSpaceError

__all__ = ["Buffer", "BufferPool", "free_bytes"]

log = logging.getLogger(__name__)

_GROW_QUANTUM = 2 << 20
_ZERO_BLOCK = bytes(16 << 20)


def free_bytes(path: Path) -> int:
    """Bytes available to an unprivileged writer on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _round_up(n: int, q: int = _GROW_QUANTUM) -> int:
    return max(q, (n + q - 1) // q * q)


@dataclass(eq=False)
class Buffer:
    """One mapped file; ``tensor`` is a uint8 view of its whole mapping."""

    path: Path
    fd: int
    capacity: int
    mapping: mmap.mmap | None = None
    tensor: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    cuda_registered: bool = False
    sparse: bool = False  # created by acquire_sparse: reserve() a range before writing it

    def memoryview(self) -> memoryview:
        assert self.mapping is not None
        return memoryview(self.mapping)

    def close(self) -> None:
        if self.cuda_registered:
            try:
                torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            except Exception:  # pragma: no cover - CUDA only
                log.debug("cudaHostUnregister failed for %s", self.path, exc_info=True)
            self.cuda_registered = False
        self.tensor = torch.empty(0, dtype=torch.uint8)
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:
                # a zero-copy tensor handed to a caller still points here; the kernel
                # unmaps when the last reference goes away
                log.debug("mapping of %s still referenced; left to the GC", self.path)
            self.mapping = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _fallocate(fd: int, start: int, end: int, path: Path) -> None:
    """Reserve ``[start, end)`` of the file; a full filesystem is InsufficientSpaceError."""
    try:
        os.posix_fallocate(fd, start, end - start)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientSpaceError(
                f"no space for {end - start} bytes of {path} "
                f"({free_bytes(path.parent)} bytes free); free space in that filesystem, "
                "lower keep_last, or point base_dir at a larger tmpfs"
            ) from e
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def _allocate(fd: int, start: int, end: int, path: Path) -> None:
    _fallocate(fd, start, end, path)
    # Writing zeros through write(2) faults the pages in far faster than touching a
    # mapping page by page; on tmpfs it also turns fallocate's reservations into pages.
    pos = start
    while pos < end:
        n = min(len(_ZERO_BLOCK), end - pos)
        pos += os.pwrite(fd, memoryview(_ZERO_BLOCK)[:n], pos)


def _map(buf: Buffer, populate: bool = True) -> None:
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    buf.mapping = mmap.mmap(buf.fd, buf.capacity, flags=flags)
    buf.tensor = torch.frombuffer(buf.mapping, dtype=torch.uint8)


class BufferPool:
    """Free buffers of one rank, kept in ``<job>/.pool`` and mapped.

    Thread-safe: the training thread acquires, the background thread releases and
    pre-faults. ``limit_bytes`` caps what this rank's buffers (free and in use) may
    occupy, for tmpfs shared with other jobs.
    """

    def __init__(self, pool_dir: Path, rank: int, limit_bytes: int | None = None) -> None:
        self.dir = pool_dir
        self.rank = rank
        self.limit_bytes = limit_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._free: list[Buffer] = []
        self._in_use: dict[int, Buffer] = {}  # inode -> buffer, for buffers now in step dirs
        self._counter = 0
        self._prefaulting = threading.Event()
        self._prefaulting.set()  # set = no pre-fault running
        for p in sorted(self.dir.glob(f"rank-{rank}.*.buf")):
            self._free.append(self._open(p))

    # -- bookkeeping -----------------------------------------------------------------
    def _next_path(self) -> Path:
        while True:
            self._counter += 1
            p = self.dir / f"rank-{self.rank}.{os.getpid()}-{self._counter}.buf"
            if not p.exists():
                return p

    def _open(self, path: Path) -> Buffer:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        buf = Buffer(path=path, fd=fd, capacity=os.fstat(fd).st_size)
        if buf.capacity:
            _map(buf)
        return buf

    def owned_bytes(self) -> int:
        with self._lock:
            return sum(b.capacity for b in self._free) + sum(
                b.capacity for b in self._in_use.values()
            )

    def _check_budget(self, extra: int, where: Path) -> None:
        if self.limit_bytes is not None:
            owned = sum(b.capacity for b in self._free) + sum(
                b.capacity for b in self._in_use.values()
            )
            if owned + extra > self.limit_bytes:
                raise InsufficientSpaceError(
                    f"rank {self.rank}: buffers would need {owned + extra} bytes, over the "
                    f"limit of {self.limit_bytes} bytes (limit_bytes) at {where}"
                )
        avail = free_bytes(where)
        if extra > avail:
            raise InsufficientSpaceError(
                f"rank {self.rank}: a save needs {extra} more bytes at {where} but only {avail} "
                "are free; free space there, lower keep_last, or use a larger tmpfs"
            )

    # -- acquire / release -------------------------------------------------------------
    def _take_fitting(self, nbytes: int) -> Buffer | None:
        """The smallest free buffer of at least ``nbytes``, removed from the free list (locked)."""
        fitting = [b for b in self._free if b.capacity >= nbytes]
        if not fitting:
            return None
        buf = min(fitting, key=lambda b: b.capacity)
        self._free.remove(buf)
        return buf

    def acquire(self, nbytes: int, *, _wait_prefault: bool = True) -> Buffer:
        """A free buffer of at least ``nbytes``, grown or created if none fits.

        Raises InsufficientSpaceError before touching anything when space is short.
        A pre-fault in progress is waited for rather than allocating a second buffer.
        """
        if _wait_prefault:
            self._prefaulting.wait()
        with self._lock:
            buf = self._take_fitting(nbytes)
            if buf is not None:
                return buf
            grow = max(self._free, key=lambda b: b.capacity) if self._free else None
            target = _round_up(nbytes)
            self._check_budget(target - (grow.capacity if grow else 0), self.dir)
            if grow is not None:
                self._free.remove(grow)
        if grow is not None:
            try:
                self._grow(grow, target)
            except BaseException:
                with self._lock:
                    self._free.append(grow)
                raise
            return grow
        return self._create(target)

    def acquire_sparse(self, nbytes: int) -> Buffer:
        """A buffer for data that arrives in ranges from several threads (a fetch).

        A free buffer is reused when one fits. Otherwise a new file is sized but not
        allocated: each writer calls :meth:`reserve` for its range first, so the page
        allocation runs in parallel and overlaps the network instead of preceding it.
        """
        with self._lock:
            buf = self._take_fitting(nbytes)
            if buf is not None:
                return buf
            capacity = _round_up(nbytes)
            self._check_budget(capacity, self.dir)
        path = self._next_path()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        buf = Buffer(path=path, fd=fd, capacity=capacity, sparse=True)
        try:
            os.ftruncate(fd, capacity)
            _map(buf, populate=False)
        except BaseException:
            buf.close()
            path.unlink(missing_ok=True)
            raise
        return buf

    def reserve(self, buf: Buffer, start: int, end: int) -> None:
        """Allocate the pages of ``[start, end)`` of a sparse buffer (raises when space is short).

        Writing into an unallocated range of a mapping on a full tmpfs would kill the
        process with SIGBUS; an allocation failure here is a clean error instead.
        """
        if buf.sparse:
            _fallocate(buf.fd, start, end, buf.path)

    def _create(self, capacity: int) -> Buffer:
        path = self._next_path()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        buf = Buffer(path=path, fd=fd, capacity=0)
        try:
            _allocate(fd, 0, capacity, path)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        buf.capacity = capacity
        _map(buf)
        log.debug("created buffer %s (%d bytes)", path, capacity)
        return buf

    def _grow(self, buf: Buffer, capacity: int) -> None:
        old = buf.capacity
        _allocate(buf.fd, old, capacity, buf.path)
        if buf.mapping is not None:
            buf.tensor = torch.empty(0, dtype=torch.uint8)
            buf.mapping.close()
        buf.capacity = capacity
        _map(buf)
        log.debug("grew buffer %s from %d to %d bytes", buf.path, old, capacity)

    def track_in_use(self, buf: Buffer) -> None:
        """Remember a buffer renamed into a step directory, so release() can reclaim it."""
        with self._lock:
            self._in_use[os.fstat(buf.fd).st_ino] = buf

    def give_back(self, buf: Buffer) -> None:
        """Return an acquired buffer that was not committed (failed save) to the free list."""
        with self._lock:
            self._free.append(buf)

    def release(self, path: Path) -> None:
        """Retire an object file: move it back into the pool as a free buffer.

        Files this pool did not create (written by an earlier process, or replicas)
        are adopted the same way, so their pages are reused rather than freed.
        """
        try:
            ino = os.stat(path).st_ino
        except FileNotFoundError:
            return
        new_path = self._next_path()
        os.rename(path, new_path)
        with self._lock:
            buf = self._in_use.pop(ino, None)
        if buf is None:
            buf = self._open(new_path)
        buf.path = new_path
        with self._lock:
            self._free.append(buf)

    def forget(self, path: Path) -> None:
        """Drop tracking of an in-use buffer whose file was removed or replaced."""
        try:
            ino = os.stat(path).st_ino
        except FileNotFoundError:
            return
        with self._lock:
            buf = self._in_use.pop(ino, None)
        if buf is not None:
            buf.close()

    def prefault(self, nbytes: int) -> None:
        """Make sure a free buffer of at least ``nbytes`` exists (call from a background thread).

        Best effort: when space is short it logs and returns, the next save will report it.
        """
        with self._lock:
            if any(b.capacity >= nbytes for b in self._free):
                return
            # a concurrent acquire() now waits for this buffer instead of making its own
            self._prefaulting.clear()
        try:
            self.give_back(self.acquire(nbytes, _wait_prefault=False))
        except InsufficientSpaceError as e:
            log.debug("rank %d: not pre-faulting a spare buffer: %s", self.rank, e)
        finally:
            self._prefaulting.set()

    def close(self, delete_free: bool = True) -> None:
        """Unmap every buffer; delete free buffer files (they hold no checkpoint)."""
        with self._lock:
            free, self._free = self._free, []
            in_use, self._in_use = self._in_use, {}
        for b in free:
            path = b.path
            b.close()
            if delete_free:
                path.unlink(missing_ok=True)
        for b in in_use.values():
            b.close()
