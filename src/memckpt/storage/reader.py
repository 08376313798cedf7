"""Read one object file: validate, verify checksums, and load into tensors.

Tensor bytes are read with ``preadv`` straight into the destination tensor when
it is a plain CPU tensor, and each chunk is hashed right after it arrives, while
it is still in cache. A fresh process thus pays no page faults on a mapping of
the object, and verification costs little beyond the copy.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from memckpt.errors import CorruptCheckpointError, DataDamagedError, StateDictMismatchError
from memckpt.storage.format import (
    HEADER_SIZE,
    ObjectHeader,
    ObjectIndex,
    TensorEntry,
    checksum,
    decode_header,
    decode_index,
    pread_exact,
)
from memckpt.storage.safe_fs import open_regular
from memckpt.storage.statedict import check_skeleton, iter_named_tensors, restore_state_dict
from memckpt.storage.tensorbytes import is_plain_cpu, tensor_memoryview

__all__ = ["ObjectReader", "TensorDamage", "load_object", "read_sections", "verify_object_bytes"]

# verify() reads and hashes a chunk in pieces this size, whatever the object's chunk size.
_VERIFY_PIECE = 4 << 20
# A file may declare this much more than twice what its filesystem stores (see read_sections).
_SPARSE_SLACK = 64 << 20


@dataclass(frozen=True)
class TensorDamage:
    """A chunk of a tensor whose bytes do not match the stored checksum."""

    tensor: str
    chunk: int
    offset: int

    def __str__(self) -> str:
        return f"tensor {self.tensor!r} chunk {self.chunk} (bytes from {self.offset})"


def read_sections(
    read: Callable[[int, int, str], bytes], size: int, where: str, stored: int | None = None
) -> tuple[ObjectHeader, ObjectIndex, bytes]:
    """Validate an object's header, index and non-tensor part, wherever its bytes are.

    ``read(offset, length, what)`` returns exactly ``length`` bytes (or raises); ``size``
    is the object's length. The one validation used for local files, peers' objects
    and replicas held in memory. ``stored``, for a file, is what its filesystem holds
    (allocated blocks): a sparse file that declares far more is refused before any
    section is read, so a few bytes on disk cannot make a reader allocate gigabytes.
    """
    h = decode_header(read(0, min(HEADER_SIZE, size), "header"), where, size)
    if stored is not None and h.end > 2 * stored + _SPARSE_SLACK:
        raise CorruptCheckpointError(
            f"{where}: declares {h.end} bytes but its filesystem stores only {stored} "
            "(a sparse file; memckpt never writes one). If a copy tool made it sparse, "
            "copy it again without holes (cp --sparse=never)"
        )

    def section(offset: int, length: int, expected: int, what: str) -> bytes:
        raw = read(offset, length, what)
        if len(raw) != length:
            raise CorruptCheckpointError(f"{where}: {what} truncated")
        if checksum(raw) != expected:
            raise DataDamagedError(f"{where}: {what} checksum mismatch")
        return raw

    index = decode_index(
        section(h.index_offset, h.index_length, h.index_checksum, "index"),
        where,
        h.data_offset,
        h.data_offset + h.data_length,
    )
    skeleton = section(h.objects_offset, h.objects_length, h.objects_checksum, "non-tensor part")
    return h, index, skeleton


class ObjectReader:
    """An open object file with its header, index and skeleton validated."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        fd = open_regular(self.path, "object")  # never a symlink, FIFO or device
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", self.where)
        self.fd = fd
        try:
            st = os.fstat(self.fd)
            self.header, self.index, self.skeleton = read_sections(
                lambda off, n, what: pread_exact(self.fd, off, n, self.where, what),
                st.st_size,
                self.where,
                stored=st.st_blocks * 512,
            )
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- reading tensor bytes ----------------------------------------------------------
    def verify(self) -> list[TensorDamage]:
        """Check the non-tensor part and re-hash every tensor; return the damaged chunks.

        Reads in pieces of at most 4 MiB, whatever the chunk size. A non-tensor part that
        does not load raises CorruptCheckpointError.
        """
        check_skeleton(self.skeleton, len(self.index.tensors), self.where)
        cs = self.index.chunk_size
        view = memoryview(bytearray(min(cs, _VERIFY_PIECE)))
        damage = []
        for e in self.index.tensors:
            for i, c in enumerate(range(0, max(e.nbytes, 1), cs)):
                n = min(cs, e.nbytes - c)
                h = xxhash.xxh3_64()
                for o in range(0, n, len(view)):
                    piece = view[: min(len(view), n - o)]
                    self._read_into(piece, e.offset + c + o, e)
                    h.update(piece)
                if h.intdigest() != e.checksums[i]:
                    damage.append(TensorDamage(e.name, i, c))
        return damage

    def _read_into(self, out: memoryview, offset: int, entry: TensorEntry) -> None:
        got = 0
        while got < len(out):
            n = os.preadv(self.fd, [out[got:]], offset + got)
            if n == 0:
                raise CorruptCheckpointError(f"{self.where}: tensor {entry.name!r} truncated")
            got += n

    def read_chunk(self, entry: TensorEntry, out: memoryview, i: int) -> TensorDamage | None:
        """Read chunk ``i`` of ``entry`` into ``out`` (the whole tensor's bytes) and check it."""
        cs = self.index.chunk_size
        c = i * cs
        piece = out[c : c + cs]
        self._read_into(piece, entry.offset + c, entry)
        if checksum(piece) != entry.checksums[i]:
            return TensorDamage(entry.name, i, c)
        return None

    def read_all(
        self, targets: list[tuple[TensorEntry, memoryview]], threads: int
    ) -> list[TensorDamage]:
        """Fill every target with its tensor's bytes, chunks spread over ``threads`` threads.

        preadv and xxhash release the GIL, so the threads copy and hash in parallel.
        """
        jobs = [
            (e, out, i)
            for e, out in targets
            for i in range(max(1, -(-e.nbytes // self.index.chunk_size)))
        ]
        if threads <= 1 or len(jobs) < 2:
            found = [self.read_chunk(e, out, i) for e, out, i in jobs]
        else:
            with concurrent.futures.ThreadPoolExecutor(threads) as ex:
                found = list(ex.map(lambda j: self.read_chunk(*j), jobs))
        return [d for d in found if d is not None]


def verify_object_bytes(
    view: memoryview, where: str, *, threads: int = 2
) -> tuple[ObjectHeader, ObjectIndex]:
    """Check a whole object held in memory (e.g. a replica just received into a mapping).

    Validates the header, index and non-tensor sections (the non-tensor part with the
    restricted loader, calling no global it does not allow), then re-hashes every tensor
    chunk, spread over ``threads`` threads (xxhash releases the GIL). Any fault raises
    CorruptCheckpointError naming ``where`` (and the damaged tensors), nothing else.
    """
    h, index, skeleton = read_sections(
        lambda off, n, what: bytes(view[off : off + n]), len(view), where
    )
    check_skeleton(skeleton, len(index.tensors), where)
    del skeleton
    cs = index.chunk_size
    jobs = [
        (e, i, e.offset + c, min(cs, e.nbytes - c))
        for e in index.tensors
        for i, c in enumerate(range(0, max(e.nbytes, 1), cs))
    ]

    def check(job: tuple[TensorEntry, int, int, int]) -> TensorDamage | None:
        e, i, off, n = job
        if checksum(view[off : off + n]) != e.checksums[i]:
            return TensorDamage(e.name, i, off - e.offset)
        return None

    if threads > 1 and len(jobs) > 1:
        with concurrent.futures.ThreadPoolExecutor(threads) as ex:
            found = list(ex.map(check, jobs))
    else:
        found = [check(j) for j in jobs]
    damage = [d for d in found if d is not None]
    if damage:
        shown = "; ".join(map(str, damage[:5]))
        more = f" and {len(damage) - 5} more" if len(damage) > 5 else ""
        raise DataDamagedError(f"{where}: checksum mismatch in {shown}{more}")
    return h, index


def _load_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _resolve_device(entry: TensorEntry, map_location: Any, where: str) -> torch.device:
    if map_location is not None:
        if callable(map_location):
            return torch.device(map_location(entry.device))
        return torch.device(map_location)
    dev = torch.device(entry.device)  # the index allows cpu and cuda[:N] only
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CorruptCheckpointError(
            f"{where}: tensor {entry.name!r} was saved on {entry.device} but CUDA is not "
            "available here; pass map_location='cpu'"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CorruptCheckpointError(
            f"{where}: tensor {entry.name!r} was saved on {entry.device} but this process "
            f"sees {torch.cuda.device_count()} GPUs; pass map_location"
        )
    return dev


def _finish_tensor(
    entry: TensorEntry,
    staging: torch.Tensor | None,
    into: torch.Tensor | None,
    map_location: Any,
    where: str,
) -> torch.Tensor:
    """Move a tensor read into host memory to where it belongs."""
    if staging is None:
        assert into is not None
        return into  # read in place
    if into is not None:
        with torch.no_grad():
            into.copy_(staging)
        return into
    device = _resolve_device(entry, map_location, where)
    out = staging if device.type == "cpu" else staging.to(device)
    if entry.is_parameter:
        return torch.nn.Parameter(out, requires_grad=entry.requires_grad)
    if entry.requires_grad:
        out.requires_grad_(True)
    return out


def _check_destination(index: ObjectIndex, dest: dict[str, torch.Tensor], strict: bool) -> None:
    problems = []
    stored = {e.name: e for e in index.tensors}
    for name, t in dest.items():
        e = stored.get(name)
        if e is None:
            if strict:
                problems.append(f"{name!r}: in the state dict but not in the checkpoint")
            continue
        if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
            problems.append(
                f"{name!r}: the state dict's tensor is an expanded view; give it "
                "its own memory (clone) to load in place"
            )
        elif tuple(t.shape) != e.shape or t.dtype != e.torch_dtype:
            problems.append(
                f"{name!r}: expected {tuple(t.shape)} {t.dtype} (the state dict), "
                f"found {e.shape} torch.{e.dtype} (the checkpoint)"
            )
    if problems:
        raise StateDictMismatchError(
            f"cannot load step {index.step} of rank {index.rank} in place; nothing was changed:\n  "
            + "\n  ".join(problems)
        )


def _merge_into(dest: Any, restored: Any) -> Any:
    """Write restored non-tensor values into ``dest``'s dicts and lists in place."""
    if isinstance(dest, dict) and isinstance(restored, dict):
        for k, v in restored.items():
            if k in dest and isinstance(dest[k], (dict, list)):
                dest[k] = _merge_into(dest[k], v)
            elif not (k in dest and isinstance(v, torch.Tensor) and dest[k] is v):
                dest[k] = v
        return dest
    if isinstance(dest, list) and isinstance(restored, list) and len(dest) == len(restored):
        for i, v in enumerate(restored):
            dest[i] = _merge_into(dest[i], v) if isinstance(dest[i], (dict, list)) else v
        return dest
    return restored


def load_object(
    path: str | os.PathLike[str] | Any,
    state_dict: Any = None,
    *,
    map_location: Any = None,
    strict: bool = True,
    safe_globals: Iterable[Any] = (),
    written: set[str] | None = None,
) -> Any:
    """Load an object file; with ``state_dict``, copy into its tensors in place.

    With ``strict`` every tensor of ``state_dict`` must be in the checkpoint. Tensors
    the checkpoint has and ``state_dict`` lacks (a fresh optimizer's state) come back
    as new tensors, merged into ``state_dict``'s dicts. Shapes and dtypes are all
    checked before any byte is copied. Checksums are verified as the bytes arrive;
    on damage a CorruptCheckpointError names the tensor and chunk (destination
    tensors may then hold partial data; the checkpoint itself is untouched).
    ``written``, when given, receives the names of ``state_dict``'s tensors this call
    wrote into, fully or (on damage) partly: a caller uses it to know what a failed
    load left modified.
    ``path`` may also be an open reader, e.g. a peer's object
    (``memckpt.transport.client.RemoteObjectReader``).
    """
    source = path if hasattr(path, "read_all") else ObjectReader(path)
    with source as reader:
        dest: dict[str, torch.Tensor] = {}
        if state_dict is not None:
            seen: set[int] = set()
            for name, t in iter_named_tensors(state_dict):
                if id(t) not in seen:  # a tied tensor is stored once, under its first name
                    seen.add(id(t))
                    dest.setdefault(name, t)
            _check_destination(reader.index, dest, strict)
        entries = reader.index.tensors
        # Validate the non-tensor part before any byte lands in the caller's tensors.
        restore_state_dict(
            reader.skeleton,
            _placeholder(len(entries), reader.where),
            safe_globals,
            where=reader.where,
        )
        loaded: list[torch.Tensor] = []
        hosts: list[torch.Tensor | None] = []
        targets: list[tuple[TensorEntry, memoryview]] = []
        for e in entries:
            into = dest.get(e.name)
            if into is not None and is_plain_cpu(into):
                host, staging = into, None
            else:
                if into is None:  # fail on a missing device before reading anything
                    _resolve_device(e, map_location, reader.where)
                host = staging = torch.empty(e.shape, dtype=e.torch_dtype)
            loaded.append(host)
            hosts.append(staging)
            targets.append((e, tensor_memoryview(host)))
            if written is not None and into is not None and staging is None:
                written.add(e.name)
        damage = reader.read_all(targets, _load_threads())
        if not damage:
            for i, (e, staging) in enumerate(zip(entries, hosts)):
                if written is not None and e.name in dest:
                    written.add(e.name)
                loaded[i] = _finish_tensor(e, staging, dest.get(e.name), map_location, reader.where)
        if damage:
            raise DataDamagedError(
                f"{reader.where}: checksum mismatch in "
                + ", ".join(str(d) for d in damage[:5])
                + (f" and {len(damage) - 5} more" if len(damage) > 5 else "")
            )
        restored = restore_state_dict(
            reader.skeleton, loaded.__getitem__, safe_globals, where=reader.where
        )
    return _merge_into(state_dict, restored) if state_dict is not None else restored


def _placeholder(count: int, where: str) -> Callable[[int], torch.Tensor]:
    empty = torch.empty(0)

    def load(i: int) -> torch.Tensor:
        if not 0 <= i < count:
            raise CorruptCheckpointError(f"{where}: tensor reference {i} out of range")
        return empty

    return load
