"""Reusable, pre-faulted, mapped buffer files: the memory checkpoints are written into.

A save copies tensors into a buffer whose pages the kernel has already given us
and whose mapping stays open, so the copy runs at memory speed instead of paying
for page faults on every save. Buffers cycle: a free buffer in ``.pool/`` is
written, renamed into a step directory on commit, and renamed back into ``.pool/``
when retention retires that step; the mapping survives every rename.

Buffers are allocated with ``posix_fallocate`` before they are mapped: writing
into a mapping of a sparse file on a full tmpfs would kill the process with
SIGBUS, whereas a failed allocation is a clean ``InsufficientSpaceError``.

When no free buffer fits, a save may take a *fresh* buffer instead
(``acquire(..., cold_ok=True)``): a new, empty file that the writer fills with
``pwrite`` straight from the tensors, so the kernel allocates each page as it
copies into it (one pass, as ``torch.save`` does) instead of zero-filling the
file, faulting the mapping in and copying again. ``pwrite`` on a full tmpfs fails
with ENOSPC, never SIGBUS. The buffer is mapped after it is written and its page
tables are filled in the background (:meth:`BufferPool.prefault`), so it joins
the pool like any other.

A buffer may be staged in one process and committed in another (DCP's async_save with
its process executor): the owner *hands it over* (:meth:`BufferPool.hand_over`: renamed
``<name>.staged``, so no pool adopts it), the committer *borrows* it by path and inode
(:func:`open_borrowed`), commits it and, when retention retires it, closes its mapping
and renames it back to a ``.buf`` name in ``.pool/``. The owner then takes it back,
still mapped and pre-faulted (:meth:`BufferPool._reclaim_returned`). A committer never
reuses or deletes a borrowed buffer.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import itertools
import logging
import mmap
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memckpt.errors import InsufficientSpaceError, MemckptError, UnsafePathError
from memckpt.storage.safe_fs import remove_entry

__all__ = [
    "STAGED_SUFFIX",
    "Buffer",
    "BufferPool",
    "free_bytes",
    "open_borrowed",
    "return_borrowed",
]

log = logging.getLogger(__name__)

_GROW_QUANTUM = 2 << 20
_ZERO_BLOCK = bytes(16 << 20)
# Linux 5.14+; Python exposes the constant only from 3.13 on
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
STAGED_SUFFIX = ".staged"
"""Appended to a pool buffer's name while another process is to commit it."""


def free_bytes(path: Path) -> int:
    """Bytes available to an unprivileged writer on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _round_up(n: int, q: int = _GROW_QUANTUM) -> int:
    return max(q, (n + q - 1) // q * q)


def _no_space(nbytes: int, path: Path, cause: OSError) -> InsufficientSpaceError | None:
    """The error to raise for ``cause``, or None when it is not a lack of space."""
    if cause.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return InsufficientSpaceError(
        f"no space for {nbytes} bytes of {path} ({free_bytes(path.parent)} bytes free); "
        "free space in that filesystem, lower keep_last, or point base_dir at a larger tmpfs"
    )


@dataclass(eq=False)
class Buffer:
    """One mapped file; ``tensor`` is a uint8 view of its whole mapping.

    A ``fresh`` buffer (from ``acquire(..., cold_ok=True)``) is an empty file, not
    mapped: fill it with :meth:`write` and then :meth:`map_written`, or make it an
    ordinary buffer with :meth:`allocate`.
    """

    path: Path
    fd: int
    capacity: int
    mapping: mmap.mmap | None = None
    tensor: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    cuda_registered: bool = False
    sparse: bool = False  # created by acquire_sparse: reserve() a range before writing it
    fresh: bool = False
    needs_populate: bool = False  # mapped after a cold write; page tables not filled yet
    borrowed: bool = False  # staged by another pool (open_borrowed): never reused or deleted
    # populate() and close() run on different threads; never unmap under a populate
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def memoryview(self) -> memoryview:
        assert self.mapping is not None, f"{self.path} is not mapped (a fresh buffer)"
        return memoryview(self.mapping)

    # -- cold write: a fresh buffer filled without a mapping ---------------------------
    def write(self, data: memoryview, offset: int) -> None:
        """``pwrite`` all of ``data`` at ``offset``; a full filesystem is InsufficientSpaceError."""
        while data:
            try:
                n = os.pwrite(self.fd, data, offset)
            except OSError as e:
                err = _no_space(self.capacity, self.path, e)
                if err is None:
                    raise
                raise err from e
            data = data[n:]
            offset += n

    def reserve(self, start: int, end: int) -> None:
        """Allocate the pages of ``[start, end)`` (raises InsufficientSpaceError when short)."""
        if end > start:
            _fallocate(self.fd, start, end, self.path)

    def map_written(self) -> None:
        """Map a fresh buffer whose every page has been written or reserved.

        The mapping is not populated here (that would cost the caller about a tenth
        of the write again); :meth:`populate` does it later, off the save's path.
        """
        assert self.fresh
        _map(self, populate=False)
        self.fresh = False
        self.needs_populate = True

    def allocate(self) -> None:
        """Turn a fresh buffer into an ordinary one: allocate, zero-fill and map it."""
        assert self.fresh
        _allocate(self.fd, 0, self.capacity, self.path)
        _map(self)
        self.fresh = False

    def populate(self) -> None:
        """Fill the page tables of a buffer mapped after a cold write, so copies into it
        do not fault page by page. Safe while other threads read or write the buffer."""
        with self._lock:
            if not self.needs_populate or self.mapping is None:
                return
            try:
                self.mapping.madvise(_MADV_POPULATE_WRITE)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    log.debug("not populating %s: %s", self.path, e)
                    return
                # kernel before 5.14: a read of one byte per page maps it (and, by
                # fault-around, its neighbours) writable; every page is allocated, so
                # no read can hit a hole (SIGBUS on a full tmpfs)
                self.tensor[:: mmap.PAGESIZE].sum()
            self.needs_populate = False

    def close(self) -> None:
        with self._lock:
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


class _BufferBusy(Exception):
    """Another live process holds this buffer file (its lock)."""


def _lock_buffer(fd: int, path: Path) -> None:
    """Mark the file as this process's for as long as the descriptor is open.

    Several processes may serve one rank's tree (DCP's async process executor opens its
    own runtime); a pool adopts only files no live process holds, so it never reuses,
    or deletes at close, a buffer another process is writing.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _BufferBusy(str(path)) from None


def _fallocate(fd: int, start: int, end: int, path: Path) -> None:
    """Reserve ``[start, end)`` of the file; a full filesystem is InsufficientSpaceError."""
    try:
        os.posix_fallocate(fd, start, end - start)
    except OSError as e:
        err = _no_space(end - start, path, e)
        if err is not None:
            raise err from e
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


def open_borrowed(path: Path, inode: int) -> Buffer:
    """Map a buffer another pool staged and handed over (see the module docstring).

    The file must still be the one handed over (``inode``): a regular file, opened
    without following links. The owner keeps its lock; this mapping is closed when the
    committer's pool releases or gives the buffer back.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UnsafePathError(
            f"{path}: the staged buffer is gone (its owner closed the job, or the process "
            "that staged it died)"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_ino != inode:
            raise UnsafePathError(f"{path}: not the buffer that was staged; refusing to commit it")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        buf = Buffer(path=path, fd=fd, capacity=st.st_size, borrowed=True)
        if buf.capacity:
            _map(buf)
    except BaseException:
        os.close(fd)
        raise
    return buf


def return_borrowed(buf: Buffer) -> None:
    """Close a borrowed buffer that was not committed, then give its file back to its owner
    under its ``.buf`` name. Closed first: once the owner sees the name, it writes into it."""
    path = buf.path
    buf.close()
    back = path.name.removesuffix(STAGED_SUFFIX)
    if back != path.name:
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, path.with_name(back))


def _where_now(buf: Buffer) -> Path | None:
    """Where the buffer's file is now (renames by other processes included); None if deleted."""
    if buf.fd < 0:
        return None
    try:
        target = os.readlink(f"/proc/self/fd/{buf.fd}")
    except OSError:  # no /proc: assume it did not move
        return buf.path
    return None if target.endswith(" (deleted)") else Path(target)


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
        self._changed = threading.Condition(self._lock)  # a pre-fault finished
        self._free: list[Buffer] = []
        self._in_use: dict[int, Buffer] = {}  # inode -> buffer, for buffers now in step dirs
        self._counter = itertools.count(1)  # next() is atomic: paths are made on any thread
        self._prefaults: list[int] = []  # sizes of the pre-faults running now
        self._prefaulting = threading.Event()
        self._prefaulting.set()  # set = no pre-fault running
        self._closed = False
        self._lent: dict[int, int] = {}  # id(buffer) -> bytes, for buffers handed out
        self._handed: dict[int, Buffer] = {}  # inode -> buffer another process is to commit
        self._delete_free = True
        self._remove_stale_staged()
        for p in sorted(self.dir.glob(f"rank-{rank}.*.buf")):
            try:
                self._free.append(self._open(p))
            except _BufferBusy:
                continue  # another live process of this rank (e.g. DCP's async saver) owns it
            except FileNotFoundError:
                continue  # deleted since the listing (a closing pool's last pre-fault)
            except (InsufficientSpaceError, UnsafePathError) as e:
                log.warning("rank %d: dropping pool file %s: %s", rank, p, e)
                p.unlink(missing_ok=True)

    def _remove_stale_staged(self) -> None:
        """Delete buffers handed over by a process that is gone (no lock held on them)."""
        for p in self.dir.glob(f"rank-{self.rank}.*.buf{STAGED_SUFFIX}"):
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                _lock_buffer(fd, p)
            except _BufferBusy:
                continue  # its owner is alive
            finally:
                os.close(fd)
            log.debug("rank %d: removing %s, handed over by a process that is gone",
                      self.rank, p)  # fmt: skip
            p.unlink(missing_ok=True)

    # -- bookkeeping -----------------------------------------------------------------
    def _next_path(self) -> Path:
        while True:
            p = self.dir / f"rank-{self.rank}.{os.getpid()}-{next(self._counter)}.buf"
            if not p.exists():
                return p

    def _open(self, path: Path) -> Buffer:
        """Adopt an existing file; _BufferBusy if a live process holds it."""
        # the tree is untrusted: never follow a planted symlink, never block on a FIFO
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafePathError(f"{path}: not a regular file; refusing to use it as a buffer")
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            _lock_buffer(fd, path)
            st = os.fstat(fd)
            buf = Buffer(path=path, fd=fd, capacity=st.st_size)
            if buf.capacity:
                if st.st_blocks * 512 < st.st_size:
                    # holes: a cold write cut short by a crash; writing into a hole through
                    # the mapping on a full tmpfs would be SIGBUS
                    _fallocate(fd, 0, buf.capacity, path)
                _map(buf)
        except BaseException:
            os.close(fd)
            raise
        return buf

    def free_capacity(self) -> int:
        """Bytes of the free buffers: what the next saves reuse without allocating.

        A pre-fault in progress counts: its buffer is on the way, and ``acquire``
        waits for it rather than allocating another.
        """
        with self._lock:
            coming = sum(_round_up(n) for n in self._prefaults)
            return sum(b.capacity for b in self._free) + coming

    def owned_bytes(self) -> int:
        """Bytes of every buffer this pool holds: free, committed, and handed out."""
        with self._lock:
            return self._owned_locked()

    def _owned_locked(self) -> int:
        return (
            sum(b.capacity for b in self._free)
            + sum(b.capacity for b in self._in_use.values() if not b.borrowed)
            + sum(b.capacity for b in self._handed.values())
            + sum(self._lent.values())
        )

    def _check_budget(self, extra: int, where: Path) -> None:
        if self.limit_bytes is not None:
            owned = self._owned_locked()
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
        if not fitting and self._reclaim_returned():
            fitting = [b for b in self._free if b.capacity >= nbytes]
        if not fitting:
            return None
        buf = min(fitting, key=lambda b: b.capacity)
        self._free.remove(buf)
        return buf

    def _reclaim_returned(self) -> bool:
        """Take back buffers of this pool that another process retired (locked).

        A buffer handed over, or committed here and retired by another process's
        retention, is free again once its file is back in ``.pool/`` under a ``.buf``
        name: the committer renames it there only after closing its own mapping. A
        handed-over one deleted meanwhile is closed and forgotten. Returns whether any
        came back.
        """
        back = False
        for table in (self._handed, self._in_use):
            for ino, b in list(table.items()):
                if b.borrowed:
                    continue
                now = _where_now(b)
                if now is None:
                    if table is self._handed:
                        del table[ino]
                        b.close()
                elif now.parent == self.dir and now.name.endswith(".buf") and now != b.path:
                    del table[ino]
                    b.path = now
                    self._free.append(b)
                    back = True
        return back

    def hand_over(self, buf: Buffer) -> None:
        """Let another process commit ``buf`` (see the module docstring); idempotent.

        The file is renamed ``<name>.staged`` so no pool adopts it, and stays mapped and
        locked here until it comes back.
        """
        with self._lock:
            if self._handed.get(os.fstat(buf.fd).st_ino) is buf:
                return
            if id(buf) not in self._lent or buf.path.parent != self.dir:
                raise MemckptError(
                    f"{buf.path}: not a staged buffer of this pool (given back already: its "
                    "save was abandoned); wait for each save before staging the next"
                )
            staged = buf.path.with_name(buf.path.name + STAGED_SUFFIX)
            os.rename(buf.path, staged)
            buf.path = staged
            self._lent.pop(id(buf), None)
            self._handed[os.fstat(buf.fd).st_ino] = buf

    def _plan_new(self, target: int, cold_ok: bool) -> Buffer | None:
        """No free buffer fits: the free buffer to grow to ``target``, or None for a new file.

        Checks space first (locked). A cold write of a new file beats growing a much
        smaller buffer (zero-fill, fault-in, then copy); growing one of at least half
        the size is cheaper, and it is the fallback when space is short.
        """
        grow = max(self._free, key=lambda b: b.capacity) if self._free else None
        if grow is not None and cold_ok and 2 * grow.capacity < target:
            try:
                self._check_budget(target, self.dir)
                return None
            except InsufficientSpaceError:
                pass
        self._check_budget(target - (grow.capacity if grow else 0), self.dir)
        if grow is not None:
            self._free.remove(grow)
        return grow

    def acquire(self, nbytes: int, *, cold_ok: bool = False, _wait_prefault: bool = True) -> Buffer:
        """See :meth:`_acquire`; the buffer counts against ``limit_bytes`` until it is
        committed (``track_in_use``), given back or discarded."""
        return self._lend(self._acquire(nbytes, cold_ok=cold_ok, _wait_prefault=_wait_prefault))

    def _lend(self, buf: Buffer) -> Buffer:
        with self._lock:
            self._lent[id(buf)] = buf.capacity
        return buf

    def _unlend(self, buf: Buffer) -> None:
        with self._lock:
            self._lent.pop(id(buf), None)

    def _acquire(
        self, nbytes: int, *, cold_ok: bool = False, _wait_prefault: bool = True
    ) -> Buffer:
        """A free buffer of at least ``nbytes``, grown or created if none fits.

        With ``cold_ok`` a new buffer may come back ``fresh`` (an empty file, see
        :class:`Buffer`) instead of allocated, zero-filled and mapped; ``writer.stage``
        fills such a buffer in one pass. Raises InsufficientSpaceError before touching
        anything when space is short. When no free buffer fits, a pre-fault in
        progress that will make one is waited for rather than allocating a second.
        """
        target = _round_up(nbytes)
        grow: Buffer | None = None
        with self._changed:
            while True:
                buf = self._take_fitting(nbytes)
                if buf is not None or not _wait_prefault:
                    break
                if not any(size >= nbytes for size in self._prefaults):
                    break
                self._changed.wait()
            if buf is None:
                grow = self._plan_new(target, cold_ok)
        if buf is not None:
            buf.populate()  # a no-op unless it was written cold and not populated since
            return buf
        if grow is not None:
            try:
                self._grow(grow, target)
            except BaseException:
                with self._lock:
                    self._free.append(grow)
                raise
            return grow
        return self._create_fresh(target) if cold_ok else self._create(target)

    def acquire_sparse(self, nbytes: int) -> Buffer:
        """See :meth:`_acquire_sparse`; counts against ``limit_bytes`` like :meth:`acquire`."""
        return self._lend(self._acquire_sparse(nbytes))

    def _acquire_sparse(self, nbytes: int) -> Buffer:
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
        _lock_buffer(fd, path)
        buf = Buffer(path=path, fd=fd, capacity=capacity, sparse=True)
        try:
            os.ftruncate(fd, capacity)
            _map(buf, populate=False)
        except BaseException:
            buf.close()
            path.unlink(missing_ok=True)
            raise
        return buf

    def adopt_file(self, path: Path) -> Buffer:
        """Take a whole file on this pool's filesystem as an acquired buffer, by a rename.

        For bytes already in the right place (an object downloaded next to the tree):
        nothing is copied. Raises OSError when the file is on another filesystem (EXDEV)
        and InsufficientSpaceError when it would exceed ``limit_bytes``; the file is then
        where it was.
        """
        new_path = self._next_path()
        os.rename(path, new_path)
        try:
            buf = self._open(new_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(new_path, path)
            raise
        try:
            with self._lock:
                owned = self._owned_locked()
            if self.limit_bytes is not None and owned + buf.capacity > self.limit_bytes:
                raise InsufficientSpaceError(
                    f"rank {self.rank}: taking {path} ({buf.capacity} bytes) as a buffer would "
                    f"exceed the limit of {self.limit_bytes} bytes (limit_bytes)"
                )
        except BaseException:
            buf.close()
            with contextlib.suppress(OSError):
                os.rename(new_path, path)
            raise
        return self._lend(buf)

    def reserve(self, buf: Buffer, start: int, end: int) -> None:
        """Allocate the pages of ``[start, end)`` of a sparse buffer (raises when space is short).

        Writing into an unallocated range of a mapping on a full tmpfs would kill the
        process with SIGBUS; an allocation failure here is a clean error instead.
        """
        if buf.sparse:
            buf.reserve(start, end)

    def _create_fresh(self, capacity: int) -> Buffer:
        path = self._next_path()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        _lock_buffer(fd, path)
        try:
            os.ftruncate(fd, capacity)  # sized, not allocated: the cold write allocates
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        log.debug("created fresh buffer %s (%d bytes, to be written cold)", path, capacity)
        return Buffer(path=path, fd=fd, capacity=capacity, fresh=True)

    def _create(self, capacity: int) -> Buffer:
        path = self._next_path()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        _lock_buffer(fd, path)
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
        with buf._lock:
            if buf.mapping is not None:
                buf.tensor = torch.empty(0, dtype=torch.uint8)
                buf.mapping.close()
            buf.capacity = capacity
            _map(buf)
            buf.needs_populate = False
        log.debug("grew buffer %s from %d to %d bytes", buf.path, old, capacity)

    def track_in_use(self, buf: Buffer) -> None:
        """Remember a buffer renamed into a step directory, so release() can reclaim it."""
        with self._lock:
            self._lent.pop(id(buf), None)
            self._in_use[os.fstat(buf.fd).st_ino] = buf

    def discard(self, buf: Buffer) -> None:
        """Give an unpublished buffer's memory back: unmap, close and delete its file.

        Unlike :meth:`give_back` it does not stay in the free list (a failed or abandoned
        replica must not hold tmpfs pages for the life of the store). A buffer already
        renamed out of the pool (published) is never deleted.
        """
        self._unlend(buf)
        if buf.borrowed:  # the owner's memory: it takes it back
            return_borrowed(buf)
            return
        path = buf.path
        if path.parent != self.dir:
            log.error("refusing to delete %s: it is no longer a pool buffer", path)
            return
        buf.close()
        path.unlink(missing_ok=True)

    def give_back(self, buf: Buffer) -> None:
        """Return an acquired buffer that was not committed (failed save) to the free list.

        A fresh buffer is deleted instead: a failed cold write leaves it part written,
        with holes that a later write through a mapping could hit.
        """
        if buf.borrowed:
            return_borrowed(buf)
            return
        with self._lock:
            self._lent.pop(id(buf), None)
            keep = not buf.fresh and not self._closed
            if keep:
                self._free.append(buf)
            delete = buf.fresh or self._delete_free
        if not keep:
            if delete:  # before close: while its lock is held no other pool can adopt it
                buf.path.unlink(missing_ok=True)
            buf.close()

    def release(self, path: Path) -> None:
        """Retire an object file: move it back into the pool as a free buffer.

        Files this pool did not create (written by an earlier process, or replicas)
        are adopted the same way, so their pages are reused rather than freed.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):  # planted: remove the entry itself, never its target
            log.warning("rank %d: deleting %s: not a regular file", self.rank, path)
            remove_entry(path)
            return
        ino = st.st_ino
        new_path = self._next_path()
        with self._lock:
            lent = self._in_use.get(ino)
            if lent is not None and lent.borrowed:
                del self._in_use[ino]
        if lent is not None and lent.borrowed:  # closed before its owner can see it back
            lent.close()
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, new_path)
            return
        os.rename(path, new_path)
        with self._lock:
            buf = self._in_use.pop(ino, None)
        if buf is None:
            try:
                buf = self._open(new_path)
            except _BufferBusy:
                # another live process's pool owns it (it staged it, or committed it and
                # our retention retired it): that pool takes it back (_reclaim_returned)
                return
            except FileNotFoundError:  # its owner took it back already
                return
            except (InsufficientSpaceError, UnsafePathError) as e:
                log.warning("rank %d: deleting retired %s instead of reusing it: %s",
                            self.rank, path, e)  # fmt: skip
                new_path.unlink(missing_ok=True)
                return
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

    # -- pre-faulting ------------------------------------------------------------------
    def _claim_prefault(self, nbytes: int) -> bool:
        """Announce a pre-fault of ``nbytes`` unless a buffer that fits exists or is coming."""
        with self._lock:
            self._reclaim_returned()
            if any(b.capacity >= nbytes for b in self._free):
                return False
            if any(size >= nbytes for size in self._prefaults):
                return False
            # from here a concurrent acquire() waits for this buffer instead of making its own
            self._prefaults.append(nbytes)
            self._prefaulting.clear()
            return True

    def _run_prefault(self, nbytes: int, claimed: bool) -> None:
        try:
            self._populate_written()
            if claimed:
                self.give_back(self.acquire(nbytes, cold_ok=False, _wait_prefault=False))
        except InsufficientSpaceError as e:
            log.debug("rank %d: not pre-faulting a spare buffer: %s", self.rank, e)
        finally:
            if claimed:
                self._end_prefault(nbytes)

    def _end_prefault(self, nbytes: int) -> None:
        with self._changed:
            self._prefaults.remove(nbytes)
            if not self._prefaults:
                self._prefaulting.set()
            self._changed.notify_all()

    def _populate_written(self) -> None:
        """Fill the page tables of buffers written cold, free or in use, so reusing them is warm."""
        with self._lock:
            todo = [b for b in (*self._free, *self._in_use.values(), *self._handed.values())
                    if b.needs_populate]  # fmt: skip
        for b in todo:
            b.populate()

    def prefault(self, nbytes: int) -> None:
        """Make sure a free buffer of at least ``nbytes`` exists (call from a background thread).

        Also fills the page tables of buffers written cold. Best effort: when space is
        short it logs and returns, the next save will report it.
        """
        self._run_prefault(nbytes, self._claim_prefault(nbytes))

    def prefault_in_background(self, nbytes: int) -> concurrent.futures.Future[None]:
        """Run :meth:`prefault` on a daemon thread; returns at once.

        The pre-fault counts as in progress from the moment this returns, so an
        ``acquire`` that follows waits for its buffer rather than allocating another.
        The future holds None, or an unexpected error (space shortage is only logged).
        """
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        claimed = self._claim_prefault(nbytes)

        def run() -> None:
            try:
                self._run_prefault(nbytes, claimed)
            except BaseException as e:
                log.warning("rank %d: background pre-fault failed: %s", self.rank, e)
                fut.set_exception(e)
            else:
                fut.set_result(None)

        fut.set_running_or_notify_cancel()
        thread = threading.Thread(target=run, name=f"memckpt-prefault-r{self.rank}", daemon=True)
        try:
            thread.start()
        except BaseException:
            if claimed:
                self._end_prefault(nbytes)
            raise
        return fut

    def wait_prefault(self, timeout: float | None = None) -> bool:
        """Wait until no pre-fault is running; False on timeout."""
        return self._prefaulting.wait(timeout)

    def close(self, delete_free: bool = True) -> None:
        """Unmap every buffer; delete free buffer files (they hold no checkpoint).

        A pre-fault still running hands its buffer back to the closed pool, which deletes
        it while still holding its lock: a pool opened meanwhile on the same directory
        finds the file busy or gone, never adopts it.
        """
        with self._lock:
            self._closed = True
            self._delete_free = delete_free
            self._reclaim_returned()
            free, self._free = self._free, []
            in_use, self._in_use = self._in_use, {}
            handed, self._handed = self._handed, {}
        # a buffer still handed over stays: its committer may be renaming it right now,
        # and a later pool removes it once no process holds it (_remove_stale_staged)
        in_use |= handed
        for b in free:
            if delete_free:
                b.path.unlink(missing_ok=True)
            b.close()
        for b in in_use.values():
            b.close()
