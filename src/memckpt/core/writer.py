"""Write one object file into a pool buffer: stage tensors, then checksum, index, header.

``stage`` is the only part that runs on the training thread. ``finalize`` runs in
the background: it waits for device copies, hashes what was staged (unless the
blocking path already did), writes the skeleton and index after the data, and the
header last.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from memckpt.core.faults import fault_point
from memckpt.core.format import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    ObjectHeader,
    ObjectIndex,
    TensorEntry,
    align,
    checksum,
    chunk_checksums,
    dtype_name,
    encode_header,
    encode_index,
    layout_offsets,
)
from memckpt.core.pool import Buffer
from memckpt.core.statedict import FlatStateDict
from memckpt.core.tensorbytes import is_plain_cpu, typed_view

__all__ = ["ObjectLayout", "StagedObject", "finalize", "plan_layout", "stage"]


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


_COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
_copy_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _copy_and_hash(
    jobs: list[tuple[int, int, int, int, int]], mv: memoryview, sums: list[list[int]]
) -> None:
    """Copy chunks (memmove) and hash each while it is in cache, on every core.

    ``jobs`` holds (tensor index, destination address, source address, bytes, offset
    in the buffer). ctypes.memmove and xxhash both release the GIL.
    """
    global _copy_pool
    if _copy_pool is None:
        _copy_pool = concurrent.futures.ThreadPoolExecutor(
            _COPY_THREADS, thread_name_prefix="memckpt-stage"
        )

    def work(job: tuple[int, int, int, int, int]) -> int:
        _, dst, src, n, off = job
        ctypes.memmove(dst, src, n)
        return checksum(mv[off : off + n])

    results = _copy_pool.map(work, jobs) if len(jobs) > 1 else map(work, jobs)
    for job, digest in zip(jobs, results):
        sums[job[0]].append(digest)


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
) -> StagedObject:
    """Copy every tensor into ``buf`` (the blocking part of a save).

    With ``hash_inline`` plain CPU tensors are copied and hashed chunk by chunk, so
    each chunk is hashed while it is still in cache.
    """
    t0 = time.perf_counter()
    # A reused buffer may still carry the header of the object it was; clear the magic
    # so a half-written buffer can never pass as an object.
    os.pwrite(buf.fd, b"\0" * 8, 0)
    has_cuda = any(t.is_cuda for t in flat.tensors)
    if has_cuda:  # pragma: no cover - needs CUDA
        _register_pinned(buf)
    mv = buf.memoryview()
    sums: list[list[int]] | None = [] if hash_inline else None
    plain_jobs: list[tuple[int, int, int, int, int]] = []
    base = buf.tensor.data_ptr()
    events = []
    for i, (t, off, n) in enumerate(zip(flat.tensors, layout.offsets, layout.nbytes)):
        if i == len(flat.tensors) // 2:
            fault_point("mid_stage", step)
        src = t.detach()
        dst = typed_view(buf.tensor, off, n, src.dtype, tuple(src.shape))
        if src.is_cuda:  # pragma: no cover - needs CUDA
            dst.copy_(src, non_blocking=True)
            if sums is not None:
                torch.cuda.current_stream(src.device).synchronize()
                sums.append(chunk_checksums(mv[off : off + n], chunk_size))
            continue
        if sums is not None and is_plain_cpu(src) and n > 0:
            # copied and hashed below, chunk by chunk on all cores
            sums.append([])
            plain_jobs.extend(
                (len(sums) - 1, base + off + c, src.data_ptr() + c, min(chunk_size, n - c), off + c)
                for c in range(0, n, chunk_size)
            )
            continue
        dst.copy_(src)
        if sums is not None:
            sums.append(chunk_checksums(mv[off : off + n], chunk_size))
    if plain_jobs:
        assert sums is not None
        _copy_and_hash(plain_jobs, mv, sums)
    if has_cuda:  # pragma: no cover - needs CUDA
        for dev in {t.device for t in flat.tensors if t.is_cuda}:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
            events.append(ev)
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
        chunk_size=chunk_size,
        checksums=sums,
        cuda_events=events,
        stage_s=time.perf_counter() - t0,
    )


def finalize(
    staged: StagedObject, *, job_id: str, step: int, rank: int, world_size: int, durable: bool
) -> tuple[int, float]:
    """Checksum, index and header (background). Returns (file bytes, seconds spent hashing)."""
    for ev in staged.cuda_events:  # pragma: no cover - needs CUDA
        ev.synchronize()
    buf, layout = staged.buf, staged.layout
    mv = buf.memoryview()
    t0 = time.perf_counter()
    sums = staged.checksums
    if sums is None:
        sums = [
            chunk_checksums(mv[off : off + n], staged.chunk_size)
            for off, n in zip(layout.offsets, layout.nbytes)
        ]
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


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
