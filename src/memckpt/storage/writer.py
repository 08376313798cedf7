"""Write one object file into a pool buffer: stage tensors, then checksum, index, header.

``stage`` is the only part that runs on the training thread: it copies into the
buffer's mapping, or, for a fresh buffer (the first save, when no pre-faulted
buffer fits), writes the file with ``pwrite`` straight from the tensors. ``finalize``
runs in the background: it waits for device copies, hashes what was staged (unless
the blocking path already did), writes the skeleton and index after the data, and
the header last.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import xxhash

from memckpt.storage.faults import fault_point
from memckpt.storage.finite import finite_check
from memckpt.storage.format import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    ObjectHeader,
    ObjectIndex,
    TensorEntry,
    align,
    checksum,
    chunk_checksums,
    dtype_from_name,
    dtype_name,
    encode_header,
    encode_index,
    layout_offsets,
)
from memckpt.storage.pool import Buffer
from memckpt.storage.scan import chunk_scanner
from memckpt.storage.statedict import FlatStateDict
from memckpt.storage.tensorbytes import is_plain_cpu, typed_view

__all__ = ["ObjectLayout", "StagedObject", "finalize", "plan_layout", "relabel", "stage"]


@dataclass(frozen=True)
class ObjectLayout:
    """Where each tensor goes in the data section; reusable while the signature holds."""

    signature: tuple[Any, ...]
    offsets: tuple[int, ...]
    nbytes: tuple[int, ...]
    data_end: int

    @property
    def data_bytes(self) -> int:
        return sum(self.nbytes)


def plan_layout(flat: FlatStateDict, previous: ObjectLayout | None) -> ObjectLayout:
    sig = flat.signature()
    if previous is not None and previous.signature == sig:
        return previous
    nbytes = [t.numel() * t.element_size() for t in flat.tensors]
    offsets, end = layout_offsets(nbytes, HEADER_SIZE)
    return ObjectLayout(sig, tuple(offsets), tuple(nbytes), end)


def meta_estimate(flat: FlatStateDict, chunk_size: int) -> int:
    """Generous size of the skeleton plus index, so the buffer rarely needs to grow."""
    chunks = sum(max(1, -(-t.numel() * t.element_size() // chunk_size)) for t in flat.tensors)
    names = sum(len(n) for n in flat.names)
    return len(flat.skeleton) + 256 + 160 * len(flat.tensors) + 24 * chunks + 2 * names


@dataclass
class StagedObject:
    """A buffer whose data section holds a copy of the state taken at save time."""

    buf: Buffer
    layout: ObjectLayout
    flat_names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    devices: list[str]
    requires_grad: list[bool]
    is_parameter: list[bool]
    skeleton: bytes
    chunk_size: int
    checksums: list[list[int]] | None = None
    cuda_events: list[Any] = field(default_factory=list)
    stage_s: float = 0.0
    non_finite: list[str] = field(default_factory=list)  # set by finalize: NaN/Inf tensors
    check_finite: list[bool] | None = None  # which tensors to check (None: every one)


_COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
_copy_pool: concurrent.futures.ThreadPoolExecutor | None = None
# Copy and hash in pieces this size: a piece just copied is still in L2 when it is hashed,
# where xxh3 runs several times faster than from memory.
_SUB_BLOCK = 256 << 10


@dataclass(frozen=True)
class _Piece:
    """One chunk of one tensor: ``nbytes`` at address ``src`` go to ``offset`` in the buffer."""

    tensor: int
    src: int
    nbytes: int
    offset: int


def _pieces(i: int, src: int, n: int, off: int, chunk_size: int) -> list[_Piece]:
    return [_Piece(i, src + c, min(chunk_size, n - c), off + c) for c in range(0, n, chunk_size)]


def _bytes_at(address: int, n: int) -> memoryview:
    return memoryview((ctypes.c_char * n).from_address(address)).cast("B")


def _run_pieces(
    pieces: list[_Piece],
    put: Callable[[_Piece, int, int], object],
    *,
    hashed: bool,
    parallel: bool = True,
) -> list[int]:
    """Copy every piece with ``put(piece, start, length)``; with ``hashed``, return its xxh3.

    With ``parallel`` pieces run on every core: memmove, pwrite and xxh3 all release
    the GIL. The digest is that of ``format.checksum`` (xxh3-64, seed 0), built piece
    by piece. Every piece has finished or been cancelled when this returns or raises,
    so the caller may close the buffer at once.
    """

    def work(p: _Piece) -> int:
        if not hashed:
            put(p, 0, p.nbytes)
            return 0
        src = _bytes_at(p.src, p.nbytes)
        h = xxhash.xxh3_64()
        for o in range(0, p.nbytes, _SUB_BLOCK):
            k = min(_SUB_BLOCK, p.nbytes - o)
            put(p, o, k)
            h.update(src[o : o + k])
        return h.intdigest()

    if not parallel or len(pieces) < 2 or _COPY_THREADS < 2:
        return [work(p) for p in pieces]
    pool = _get_copy_pool()
    futs = [pool.submit(work, p) for p in pieces]
    concurrent.futures.wait(futs, return_when=concurrent.futures.FIRST_EXCEPTION)
    for f in futs:
        f.cancel()  # after a failure, those not started yet
    concurrent.futures.wait(futs)
    for f in futs:
        if not f.cancelled() and f.exception() is not None:
            raise f.exception()  # type: ignore[misc]
    return [f.result() for f in futs]


def _unwritten_pages(layout: ObjectLayout, capacity: int) -> list[tuple[int, int]]:
    """Page-aligned ranges of ``[0, capacity)`` that hold no tensor byte (header, tail)."""
    page = mmap.PAGESIZE
    out, pos = [], 0
    for off, n in zip(layout.offsets, layout.nbytes):  # offsets ascend
        if n == 0:
            continue
        first = off // page * page
        if first > pos:
            out.append((pos, first))
        pos = max(pos, -(-(off + n) // page) * page)
    if pos < capacity:
        out.append((pos, capacity))
    return out


def _register_pinned(buf: Buffer) -> None:  # pragma: no cover - needs CUDA
    if buf.cuda_registered or buf.capacity == 0:
        return
    rc = torch.cuda.cudart().cudaHostRegister(buf.tensor.data_ptr(), buf.capacity, 0)
    buf.cuda_registered = int(rc) == 0


def stage(
    flat: FlatStateDict,
    layout: ObjectLayout,
    buf: Buffer,
    *,
    hash_inline: bool,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    step: int = -1,
    cuda_stream: Any = None,
) -> StagedObject:
    """Copy every tensor into ``buf`` (the blocking part of a save).

    With ``hash_inline`` plain CPU tensors are copied and hashed piece by piece, so
    each piece is hashed while it is still in cache. A ``fresh`` buffer (see
    ``BufferPool.acquire(cold_ok=True)``) is written with ``pwrite`` from the tensors
    and mapped afterwards; with CUDA tensors it is allocated and mapped first.
    CUDA tensors are copied asynchronously into the (registered) mapping, on
    ``cuda_stream`` if given (after the work already queued on the current stream),
    else on the current stream; ``StagedObject.cuda_events`` mark their end.
    Raises InsufficientSpaceError when the filesystem fills up meanwhile.
    """
    t0 = time.perf_counter()
    if buf.fresh and any(t.device.type != "cpu" for t in flat.tensors):
        buf.allocate()  # device copies land in a mapping
    if buf.fresh:
        sums = _write_cold(flat, layout, buf, hash_inline, chunk_size, step)
        events: list[Any] = []
    else:
        sums, events = _copy_warm(flat, layout, buf, hash_inline, chunk_size, step, cuda_stream)
    return _staged_object(
        buf,
        layout,
        flat,
        chunk_size=chunk_size,
        checksums=sums,
        cuda_events=events,
        stage_s=time.perf_counter() - t0,
    )


def _copy_warm(
    flat: FlatStateDict,
    layout: ObjectLayout,
    buf: Buffer,
    hash_inline: bool,
    chunk_size: int,
    step: int,
    cuda_stream: Any = None,
) -> tuple[list[list[int]] | None, list[Any]]:
    """Copy into the mapping of a buffer whose pages are already there."""
    # A reused buffer may still carry the header of the object it was; clear the magic
    # so a half-written buffer can never pass as an object.
    os.pwrite(buf.fd, b"\0" * 8, 0)
    has_cuda = any(t.is_cuda for t in flat.tensors)
    if has_cuda:  # pragma: no cover - needs CUDA
        _register_pinned(buf)
        if cuda_stream is not None:  # copy what the training stream has computed so far
            cuda_stream.wait_stream(torch.cuda.current_stream(cuda_stream.device))
    mv = buf.memoryview()
    sums: list[list[int]] | None = [[] for _ in flat.tensors] if hash_inline else None
    pieces: list[_Piece] = []
    base = buf.tensor.data_ptr()
    events = []
    for i, (t, off, n) in enumerate(zip(flat.tensors, layout.offsets, layout.nbytes)):
        if i == len(flat.tensors) // 2:
            fault_point("mid_stage", step)
        src = t.detach()
        dst = typed_view(buf.tensor, off, n, src.dtype, tuple(src.shape))
        if src.is_cuda:  # pragma: no cover - needs CUDA
            if cuda_stream is not None:
                with torch.cuda.stream(cuda_stream):
                    dst.copy_(src, non_blocking=True)
                # the caching allocator must not reuse src's memory before the copy ran
                src.record_stream(cuda_stream)
            else:
                dst.copy_(src, non_blocking=True)
            if sums is not None:
                (cuda_stream or torch.cuda.current_stream(src.device)).synchronize()
                sums[i] = chunk_checksums(mv[off : off + n], chunk_size)
            continue
        if is_plain_cpu(src) and n > 0:
            # copied below, on every core: plain memmoves do not slow down when another
            # process holds a core, as the OpenMP team of copy_ does
            pieces.extend(_pieces(i, src.data_ptr(), n, off, chunk_size))
            continue
        dst.copy_(src)
        if sums is not None:
            sums[i] = chunk_checksums(mv[off : off + n], chunk_size)
    digests = _run_pieces(
        pieces,
        lambda p, o, k: ctypes.memmove(base + p.offset + o, p.src + o, k),
        hashed=sums is not None,
    )
    if sums is not None:
        for p, d in zip(pieces, digests):
            sums[p.tensor].append(d)
    if has_cuda:  # pragma: no cover - needs CUDA
        if cuda_stream is not None:
            ev = torch.cuda.Event()
            ev.record(cuda_stream)
            events.append(ev)
        else:
            for dev in {t.device for t in flat.tensors if t.is_cuda}:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(dev))
                events.append(ev)
    return sums, events


def relabel(
    staged: StagedObject, flat: FlatStateDict, *, chunk_size: int | None = None
) -> StagedObject | None:
    """``staged``'s buffer described as holding ``flat``, whose tensors are views of it.

    No byte moves: each tensor of ``flat`` must be a plain (contiguous, CPU) view of the
    buffer's data section, as what a DCP planner resolves from staged views is; the
    object is then indexed under ``flat``'s names, skeleton and offsets. Bytes that no
    tensor of ``flat`` names stay in the file unindexed. None when a tensor is not such
    a view (the caller copies instead).
    """
    buf = staged.buf
    if buf.mapping is None:
        return None
    base = buf.tensor.data_ptr()
    lo, hi = base + HEADER_SIZE, base + staged.layout.data_end
    offsets, nbytes = [], []
    for t in flat.tensors:
        n = t.numel() * t.element_size()
        if n == 0:
            offsets.append(HEADER_SIZE)
            nbytes.append(0)
            continue
        p = t.data_ptr()
        if not is_plain_cpu(t) or not (lo <= p and p + n <= hi):
            return None
        offsets.append(p - base)
        nbytes.append(n)
    layout = ObjectLayout(flat.signature(), tuple(offsets), tuple(nbytes), staged.layout.data_end)
    return _staged_object(
        buf,
        layout,
        flat,
        chunk_size=chunk_size or staged.chunk_size,
        cuda_events=list(staged.cuda_events),
        stage_s=staged.stage_s,
    )


def _staged_object(
    buf: Buffer, layout: ObjectLayout, flat: FlatStateDict, **rest: Any
) -> StagedObject:
    """A StagedObject of ``flat`` in ``buf``: the per-tensor facts its index records."""
    return StagedObject(
        buf=buf,
        layout=layout,
        flat_names=list(flat.names),
        dtypes=[dtype_name(t.dtype) for t in flat.tensors],
        shapes=[tuple(t.shape) for t in flat.tensors],
        devices=[str(t.device) for t in flat.tensors],
        requires_grad=[bool(t.requires_grad) for t in flat.tensors],
        is_parameter=[isinstance(t, nn.Parameter) for t in flat.tensors],
        skeleton=flat.skeleton,
        **rest,
    )


def _write_cold(
    flat: FlatStateDict,
    layout: ObjectLayout,
    buf: Buffer,
    hash_inline: bool,
    chunk_size: int,
    step: int,
) -> list[list[int]] | None:
    """Fill a fresh buffer with ``pwrite`` from CPU tensors, then map it.

    The kernel allocates each page as it copies into it: one pass over the bytes,
    where allocate-then-copy takes a zero-fill, a fault-in and the copy. pwrites to
    one tmpfs file run one at a time, so hashing overlaps them on the other cores.
    """
    # Pages no tensor byte lands in (header, tail for the index) are reserved first:
    # a full filesystem then fails before gigabytes are copied, and the mapped
    # buffer has no hole a later write could hit (SIGBUS on a full tmpfs).
    for start, end in _unwritten_pages(layout, buf.capacity):
        buf.reserve(start, end)
    sums: list[list[int]] | None = [[] for _ in flat.tensors] if hash_inline else None
    pieces: list[_Piece] = []
    values: list[
        torch.Tensor
    ] = []  # contiguous copies of tensors whose memory is not their values in order
    for i, (t, off, n) in enumerate(zip(flat.tensors, layout.offsets, layout.nbytes)):
        if i == len(flat.tensors) // 2:
            fault_point("mid_stage", step)
        if n == 0:
            if sums is not None:
                sums[i] = chunk_checksums(memoryview(b""), chunk_size)
            continue
        src = t.detach()
        if not is_plain_cpu(src):
            src = torch.empty(src.shape, dtype=src.dtype).copy_(src)
            values.append(src)
        pieces.extend(_pieces(i, src.data_ptr(), n, off, chunk_size))
    digests = _run_pieces(
        pieces,
        lambda p, o, k: buf.write(_bytes_at(p.src + o, k), p.offset + o),
        hashed=sums is not None,
        parallel=sums is not None,  # unhashed, there is nothing to overlap the pwrites with
    )
    if sums is not None:
        for p, d in zip(pieces, digests):
            sums[p.tensor].append(d)
    buf.map_written()
    return sums


def finalize(
    staged: StagedObject, *, job_id: str, step: int, rank: int, world_size: int, durable: bool
) -> tuple[int, float]:
    """Checksum, index and header (background). Returns (file bytes, seconds spent hashing)."""
    for ev in staged.cuda_events:  # pragma: no cover - needs CUDA
        ev.synchronize()
    buf, layout = staged.buf, staged.layout
    t0 = time.perf_counter()
    sums, finite = _scan_staged(staged)
    staged.non_finite = [n for n, ok in zip(staged.flat_names, finite) if not ok]
    hash_s = time.perf_counter() - t0
    entries = tuple(
        TensorEntry(
            name=name,
            dtype=dt,
            shape=shape,
            offset=off,
            nbytes=n,
            checksums=tuple(cs),
            device=dev,
            requires_grad=rg,
            is_parameter=isp,
        )
        for name, dt, shape, off, n, cs, dev, rg, isp in zip(
            staged.flat_names,
            staged.dtypes,
            staged.shapes,
            layout.offsets,
            layout.nbytes,
            sums,
            staged.devices,
            staged.requires_grad,
            staged.is_parameter,
        )
    )
    index = ObjectIndex(
        job_id=job_id,
        step=step,
        rank=rank,
        world_size=world_size,
        chunk_size=staged.chunk_size,
        tensors=entries,
        created_unix=time.time(),
    )
    index_bytes = encode_index(index)
    objects_offset = align(layout.data_end)
    index_offset = align(objects_offset + len(staged.skeleton))
    _pwrite_all(buf.fd, staged.skeleton, objects_offset)
    _pwrite_all(buf.fd, index_bytes, index_offset)
    header = ObjectHeader(
        data_offset=HEADER_SIZE,
        data_length=layout.data_end - HEADER_SIZE,
        index_offset=index_offset,
        index_length=len(index_bytes),
        index_checksum=checksum(index_bytes),
        objects_offset=objects_offset,
        objects_length=len(staged.skeleton),
        objects_checksum=checksum(staged.skeleton),
    )
    if durable:
        os.fsync(buf.fd)
    fault_point("before_header", step)
    _pwrite_all(buf.fd, encode_header(header), 0)
    if durable:
        os.fsync(buf.fd)
    return index_offset + len(index_bytes), hash_s


def _scan_staged(staged: StagedObject) -> tuple[list[list[int]], list[bool]]:
    """Per tensor: its chunk checksums (unless staging hashed them) and whether it is finite.

    One pass over the staged bytes, chunks spread over the copy threads; each chunk is
    hashed and checked for NaN/Inf in one read (``memckpt.storage.scan``). A tensor
    already found non-finite is not checked further.
    """
    layout, chunk = staged.layout, staged.chunk_size
    mv = staged.buf.memoryview()
    wanted = staged.check_finite or [True] * len(staged.dtypes)
    checks = [finite_check(dtype_from_name(dt)) if w else None
              for dt, w in zip(staged.dtypes, wanted)]  # fmt: skip
    known = staged.checksums
    # pieces of a chunk are whole elements when the chunk size is (itemsize <= 16)
    aligned = chunk % 16 == 0 and _SUB_BLOCK % 16 == 0
    finite = [True] * len(checks)
    scanners = [
        chunk_scanner(dtype_from_name(dt) if (check is not None and aligned) else None,
                      hashed=known is None)
        for dt, check in zip(staged.dtypes, checks)
    ]  # fmt: skip
    jobs = [
        (i, off + c, min(chunk, n - c))
        for i, (off, n) in enumerate(zip(layout.offsets, layout.nbytes))
        for c in range(0, n, chunk)
    ]

    def work(job: tuple[int, int, int]) -> int:
        i, start, n = job
        scanner = scanners[i]
        if known is not None and (not scanner.checks or not finite[i]):
            return 0  # hashed while staging, and nothing (more) to check
        digest, ok = scanner.scan(mv[start : start + n])
        if not ok:
            finite[i] = False
        return digest

    if len(jobs) < 2 or _COPY_THREADS < 2:
        digests = [work(j) for j in jobs]
    else:
        digests = list(_get_copy_pool().map(work, jobs))
    if known is not None:
        sums = known
    else:
        sums = [[] for _ in checks]
        for (i, _, _), d in zip(jobs, digests):
            sums[i].append(d)
        for i, n in enumerate(layout.nbytes):
            if n == 0:
                sums[i] = [checksum(b"")]
    if not aligned:  # an odd chunk size: check whole tensors in element-aligned pieces
        for i, (off, n) in enumerate(zip(layout.offsets, layout.nbytes)):
            check = checks[i]
            if check is not None:
                finite[i] = all(check(mv[o : o + min(_SUB_BLOCK, off + n - o)])
                                for o in range(off, off + n, _SUB_BLOCK))  # fmt: skip
    return sums, finite


def _get_copy_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _copy_pool
    if _copy_pool is None:
        _copy_pool = concurrent.futures.ThreadPoolExecutor(
            _COPY_THREADS, thread_name_prefix="memckpt-stage"
        )
    return _copy_pool


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
