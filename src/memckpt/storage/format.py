"""The object file: versioned header, aligned tensor bytes, a JSON index and the non-tensor part.

Layout of one object file (all integers little-endian)::

    [0, 4096)                     header: magic, version, section offsets/lengths/checksums
    [data_offset, +data_length)   tensor bytes, each tensor aligned to DATA_ALIGN
    [index_offset, +index_length) JSON index: one entry per tensor (name, dtype, shape,
                                  offset, nbytes, one xxh3-64 checksum per chunk)
    [objects_offset, +length)     pickled skeleton of the state dict (tensors replaced by
                                  references), read back only through a restricted loader

The header is written last: a file whose header does not validate is not an object.
Tensor bytes are never pickled. Decoding trusts no field, checksummed or not: sizes are
checked against the section that holds them and against fixed limits (MAX_CHUNK_SIZE,
MAX_INDEX_BYTES, MAX_NDIM) before anything is allocated, and every fault is a
CorruptCheckpointError naming the object.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import torch
import xxhash

from memckpt.errors import CorruptCheckpointError

__all__ = [
    "DATA_ALIGN",
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "ObjectHeader",
    "ObjectIndex",
    "TensorEntry",
    "align",
    "chunk_checksums",
    "decode_header",
    "decode_index",
    "dtype_from_name",
    "dtype_name",
    "encode_header",
    "encode_index",
    "pread_exact",
    "read_header",
]

MAGIC: Final = b"MEMCKPT\x00"
FORMAT_VERSION: Final = 1
HEADER_SIZE: Final = 4096
DATA_ALIGN: Final = 64
DEFAULT_CHUNK_SIZE: Final = 4 << 20
MAX_CHUNK_SIZE: Final = 1 << 30
MAX_INDEX_BYTES: Final = 1 << 30
MAX_NDIM: Final = 64
# What a stored tensor's device may be: memckpt stores CPU and CUDA tensors only.
_DEVICE: Final = re.compile(r"cpu|cuda(?::[0-9]{1,4})?")

# magic, version, header_size, data_offset, data_length,
# index_offset, index_length, index_checksum, objects_offset, objects_length, objects_checksum
_HEADER_FIELDS: Final = struct.Struct("<8sIIQQQQQQQQ")
_HEADER_CHECKSUM: Final = struct.Struct("<Q")


def align(n: int, alignment: int = DATA_ALIGN) -> int:
    """Round ``n`` up to a multiple of ``alignment``."""
    return (n + alignment - 1) // alignment * alignment


def checksum(data: Any) -> int:
    """xxh3-64 of a buffer; releases the GIL while hashing."""
    return xxhash.xxh3_64_intdigest(data)


def chunk_checksums(data: memoryview, chunk_size: int) -> list[int]:
    """Checksums of consecutive ``chunk_size`` pieces of ``data`` (one for empty data)."""
    if len(data) == 0:
        return [checksum(b"")]
    return [checksum(data[o : o + chunk_size]) for o in range(0, len(data), chunk_size)]


_DTYPES: Final[dict[str, torch.dtype]] = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, where: str = "") -> torch.dtype:
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise CorruptCheckpointError(
            f"{where}: unknown dtype {name!r} (written by a newer torch?)"
        ) from None


@dataclass(frozen=True)
class ObjectHeader:
    """Where each section of an object file lies, and the checksums of the small sections."""

    data_offset: int
    data_length: int
    index_offset: int
    index_length: int
    index_checksum: int
    objects_offset: int
    objects_length: int
    objects_checksum: int
    version: int = FORMAT_VERSION
    digest: int = 0  # checksum of the header fields as stored; identifies the whole object

    @property
    def end(self) -> int:
        return max(
            self.data_offset + self.data_length,
            self.index_offset + self.index_length,
            self.objects_offset + self.objects_length,
        )


def encode_header(h: ObjectHeader) -> bytes:
    body = _HEADER_FIELDS.pack(
        MAGIC,
        h.version,
        HEADER_SIZE,
        h.data_offset,
        h.data_length,
        h.index_offset,
        h.index_length,
        h.index_checksum,
        h.objects_offset,
        h.objects_length,
        h.objects_checksum,
    )
    return body + _HEADER_CHECKSUM.pack(checksum(body))


def decode_header(raw: bytes, where: str, file_size: int | None = None) -> ObjectHeader:
    """Parse and validate a header; raise CorruptCheckpointError naming ``where`` on any fault."""
    need = _HEADER_FIELDS.size + _HEADER_CHECKSUM.size
    if len(raw) < need:
        raise CorruptCheckpointError(f"{where}: truncated header ({len(raw)} of {need} bytes)")
    body = raw[: _HEADER_FIELDS.size]
    (stored,) = _HEADER_CHECKSUM.unpack_from(raw, _HEADER_FIELDS.size)
    fields = _HEADER_FIELDS.unpack(body)
    if fields[0] != MAGIC:
        raise CorruptCheckpointError(f"{where}: not a memckpt object (bad magic {fields[0]!r})")
    if fields[1] != FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{where}: object format version {fields[1]}, this memckpt reads {FORMAT_VERSION}"
        )
    if checksum(body) != stored:
        raise CorruptCheckpointError(f"{where}: header checksum mismatch")
    h = ObjectHeader(*fields[3:], version=fields[1], digest=stored)
    if fields[2] != HEADER_SIZE or h.data_offset < HEADER_SIZE or h.index_length > MAX_INDEX_BYTES:
        raise CorruptCheckpointError(f"{where}: header fields out of range")
    if file_size is not None and h.end > file_size:
        raise CorruptCheckpointError(
            f"{where}: truncated object (needs {h.end} bytes, file has {file_size})"
        )
    return h


def pread_exact(fd: int, offset: int, length: int, where: str, what: str) -> bytes:
    """``length`` bytes at ``offset``, looping: Linux returns at most ~2 GiB per call."""
    if length < (1 << 30):
        out = os.pread(fd, length, offset)
        if len(out) == length:
            return out
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got : got + (1 << 30)]], offset + got)
        if n == 0:
            raise CorruptCheckpointError(f"{where}: {what} truncated (ends after {got} bytes)")
        got += n
    return bytes(buf)


def read_header(fd: int, where: str) -> ObjectHeader:
    size = os.fstat(fd).st_size
    return decode_header(pread_exact(fd, 0, min(HEADER_SIZE, size), where, "header"), where, size)


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: where its bytes are and how to rebuild it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksums: tuple[int, ...] = ()
    device: str = "cpu"
    requires_grad: bool = False
    is_parameter: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype, f"tensor {self.name!r}")


@dataclass(frozen=True)
class ObjectIndex:
    """What one object file holds: its identity and every tensor's entry."""

    job_id: str
    step: int
    rank: int
    world_size: int
    chunk_size: int
    tensors: tuple[TensorEntry, ...]
    created_unix: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def encode_index(index: ObjectIndex) -> bytes:
    doc = {
        "format": FORMAT_VERSION,
        "job_id": index.job_id,
        "step": index.step,
        "rank": index.rank,
        "world_size": index.world_size,
        "chunk_size": index.chunk_size,
        "created_unix": index.created_unix,
        "extra": index.extra,
        "tensors": [
            [
                t.name,
                t.dtype,
                list(t.shape),
                t.offset,
                t.nbytes,
                list(t.checksums),
                t.device,
                t.requires_grad,
                t.is_parameter,
            ]
            for t in index.tensors
        ],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CorruptCheckpointError(f"{where}: malformed index: {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def decode_index(raw: bytes, where: str, data_offset: int, data_end: int) -> ObjectIndex:
    """Parse and validate an index; every tensor must lie inside the data section."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CorruptCheckpointError(f"{where}: index is not valid JSON ({e})") from None
    _expect(isinstance(doc, dict), where, "not an object")
    for key in ("step", "rank", "world_size", "chunk_size"):
        _expect(_is_int(doc.get(key)) and doc[key] >= 0, where, f"field {key!r}")
    _expect(
        0 < doc["chunk_size"] <= MAX_CHUNK_SIZE,
        where,
        f"chunk_size {doc['chunk_size']} outside 1..{MAX_CHUNK_SIZE}",
    )
    created = doc.get("created_unix", 0.0)
    _expect(
        (_is_int(created) and abs(created) < 1 << 53)
        or (isinstance(created, float) and math.isfinite(created)),
        where,
        "field 'created_unix' is not a time in seconds",
    )
    _expect(isinstance(doc.get("job_id"), str), where, "field 'job_id'")
    _expect(isinstance(doc.get("tensors"), list), where, "field 'tensors'")
    entries = []
    for i, t in enumerate(doc["tensors"]):
        _expect(isinstance(t, list) and len(t) == 9, where, f"tensor #{i}")
        name, dt, shape, off, nbytes, sums, device, rg, isp = t
        _expect(isinstance(name, str), where, f"tensor #{i} name")
        _expect(isinstance(dt, str), where, f"tensor {name!r} dtype")
        dtype = dtype_from_name(dt, f"{where}: tensor {name!r}")
        _expect(
            isinstance(shape, list)
            and len(shape) <= MAX_NDIM
            and all(_is_int(s) and s >= 0 for s in shape),
            where,
            f"tensor {name!r} shape",
        )
        # torch multiplies the dimensions (a zero counts as one) into strides that must fit int64
        _expect(
            math.prod(max(s, 1) for s in shape) * dtype.itemsize < 1 << 63,
            where,
            f"tensor {name!r} shape {shape} overflows 64-bit sizes",
        )
        _expect(_is_int(off) and _is_int(nbytes), where, f"tensor {name!r} extent")
        numel = math.prod(shape)
        _expect(
            nbytes == numel * dtype.itemsize, where, f"tensor {name!r} size disagrees with shape"
        )
        _expect(data_offset <= off and off + nbytes <= data_end, where, f"tensor {name!r} extent")
        n_chunks = max(1, -(-nbytes // doc["chunk_size"]))
        _expect(
            isinstance(sums, list) and len(sums) == n_chunks and all(_is_int(s) for s in sums),
            where,
            f"tensor {name!r} checksums",
        )
        _expect(
            isinstance(device, str) and _DEVICE.fullmatch(device) is not None,
            where,
            f"tensor {name!r} device {str(device)[:40]!r} (memckpt stores cpu and cuda tensors)",
        )
        _expect(
            isinstance(rg, bool) and isinstance(isp, bool), where, f"tensor {name!r} grad flags"
        )
        _expect(
            not rg or dtype.is_floating_point or dtype.is_complex,
            where,
            f"tensor {name!r} of dtype {dt} cannot require gradients",
        )
        entries.append(
            TensorEntry(name, dt, tuple(shape), off, nbytes, tuple(sums), device, rg, isp)
        )
    extra = doc.get("extra", {})
    _expect(isinstance(extra, dict), where, "field 'extra'")
    return ObjectIndex(
        job_id=doc["job_id"],
        step=doc["step"],
        rank=doc["rank"],
        world_size=doc["world_size"],
        chunk_size=doc["chunk_size"],
        tensors=tuple(entries),
        created_unix=float(created),
        extra=extra,
    )


def layout_offsets(nbytes: Sequence[int], start: int = HEADER_SIZE) -> tuple[list[int], int]:
    """Aligned offsets for tensors of the given sizes, and the end of the data section."""
    offsets = []
    pos = start
    for n in nbytes:
        pos = align(pos)
        offsets.append(pos)
        pos += n
    return offsets, pos
