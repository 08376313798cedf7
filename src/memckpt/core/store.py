"""One node-local checkpoint tree: layout, save lifecycle, inventory, retention.

Layout under ``<base_dir>/<job_id>/``::

    .pool/rank-<r>.<n>.buf   free, pre-faulted buffers of rank r
    step-<N>.writing.<r>     present while rank r writes step N
    step-<N>/rank-<r>.mck    rank r's data for step N (appears atomically, by rename)
    step-<N>/.committed      written once every rank committed step N

A save: ``begin`` (marker) -> write into a pool buffer -> ``commit_local`` (rename
into the step directory, remove the marker) -> global vote -> ``mark_committed``.
A crash at any instant leaves either no object or a complete one; an object file
exists under its final name only after its header (written last) is in place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from memckpt import ids
from memckpt.core.format import read_header
from memckpt.core.pool import Buffer, BufferPool
from memckpt.errors import CorruptCheckpointError

__all__ = ["CheckpointStore", "ObjectInfo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectInfo:
    """An object file present in the tree, with a header that validated."""

    step: int
    rank: int
    path: Path
    size: int


class CheckpointStore:
    """The checkpoint tree of one job on one node, as seen by one rank."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        job_id: str,
        rank: int,
        limit_bytes: int | None = None,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.job_id = ids.validate_job_id(job_id)
        self.rank = ids.validate_rank(rank)
        self.root = self.base_dir / self.job_id
        self.root.mkdir(parents=True, exist_ok=True)
        self.pool = BufferPool(self.root / ids.POOL_DIR, rank, limit_bytes)

    # -- paths ---------------------------------------------------------------------------
    def step_dir(self, step: int) -> Path:
        return self.root / ids.step_dir_name(step)

    def object_path(self, step: int, rank: int) -> Path:
        return self.step_dir(step) / ids.object_name(rank)

    def marker_path(self, step: int, rank: int) -> Path:
        return self.root / ids.writing_marker_name(step, rank)

    # -- save lifecycle ----------------------------------------------------------------
    def remove_stale_markers(self) -> list[int]:
        """Remove this rank's writing markers left by a crashed process; return their steps."""
        steps = []
        for entry in os.scandir(self.root):
            parsed = ids.parse_writing_marker(entry.name)
            if parsed and parsed[1] == self.rank:
                os.unlink(entry.path)
                steps.append(parsed[0])
        if steps:
            log.info("rank %d: removed markers of interrupted saves of steps %s", self.rank, steps)
        return steps

    def begin(self, step: int) -> None:
        """Mark that this rank writes ``step``; drop an older object of the same step."""
        self.marker_path(step, self.rank).touch()
        committed = self.step_dir(step) / ids.COMMITTED_MARKER
        committed.unlink(missing_ok=True)
        old = self.object_path(step, self.rank)
        if old.exists():
            self.pool.release(old)

    def commit_local(self, step: int, buf: Buffer) -> Path:
        """Atomically publish a fully written buffer as this rank's object for ``step``."""
        d = self.step_dir(step)
        d.mkdir(exist_ok=True)
        final = d / ids.object_name(self.rank)
        os.rename(buf.path, final)
        buf.path = final
        self.pool.track_in_use(buf)
        self.marker_path(step, self.rank).unlink(missing_ok=True)
        return final

    def adopt(self, step: int, rank: int, buf: Buffer) -> Path:
        """Publish a verified object of ``rank`` (a replica, or a copy fetched from a peer).

        The buffer's file is renamed to its final name in one step, so a partial copy is
        never visible; an older copy under that name is replaced.
        """
        final = self.object_path(step, rank)
        self.pool.forget(final)
        for attempt in range(3):
            final.parent.mkdir(exist_ok=True)
            try:
                os.rename(buf.path, final)
                break
            except FileNotFoundError:  # retention removed the empty step dir meanwhile
                if attempt == 2:
                    raise
        buf.path = final
        self.pool.track_in_use(buf)
        return final

    def abort(self, step: int, buf: Buffer | None) -> None:
        """Undo a failed save: free its buffer, remove the marker; nothing else is touched."""
        if buf is not None:
            self.pool.give_back(buf)
        self.marker_path(step, self.rank).unlink(missing_ok=True)

    def mark_committed(self, step: int, world_size: int) -> None:
        """Record that every rank committed ``step`` (idempotent, atomic)."""
        d = self.step_dir(step)
        d.mkdir(exist_ok=True)
        tmp = d / f"{ids.COMMITTED_MARKER}.tmp.{self.rank}.{os.getpid()}"
        tmp.write_text(json.dumps({"step": step, "world_size": world_size, "time": time.time()}))
        os.rename(tmp, d / ids.COMMITTED_MARKER)

    def is_committed(self, step: int) -> bool:
        return (self.step_dir(step) / ids.COMMITTED_MARKER).exists()

    # -- inventory ---------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps that have a directory in this tree, oldest first."""
        out = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        for entry in entries:
            step = ids.parse_step_dir(entry.name)
            if step is not None and entry.is_dir():
                out.append(step)
        return sorted(out)

    def objects(self, step: int, validate: bool = True) -> list[ObjectInfo]:
        """Objects of ``step`` in this tree; with ``validate``, only those whose header checks."""
        d = self.step_dir(step)
        out = []
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            return []
        for entry in entries:
            rank = ids.parse_object_name(entry.name)
            if rank is None:
                continue
            path = Path(entry.path)
            try:
                if validate:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        read_header(fd, str(path))
                    finally:
                        os.close(fd)
                out.append(ObjectInfo(step, rank, path, entry.stat().st_size))
            except FileNotFoundError:
                continue
            except CorruptCheckpointError as e:
                log.warning("rank %d: ignoring damaged object: %s", self.rank, e)
        return sorted(out, key=lambda o: o.rank)

    def inventory(self) -> dict[int, list[int]]:
        """For each step, the source ranks whose objects this tree holds with a valid header."""
        inv: dict[int, list[int]] = {}
        for step in self.steps():
            ranks = [o.rank for o in self.objects(step)]
            if ranks:
                inv[step] = ranks
        return inv

    # -- retention ---------------------------------------------------------------------
    def delete_step(self, step: int) -> None:
        """Retire this rank's object of ``step`` (its buffer goes back to the pool).

        The ``.committed`` marker goes first so the step never looks complete while
        it is being taken apart; the directory goes when its last object has.
        """
        d = self.step_dir(step)
        (d / ids.COMMITTED_MARKER).unlink(missing_ok=True)
        own = self.object_path(step, self.rank)
        if own.exists():
            self.pool.release(own)
        self._remove_if_empty(d)

    def delete_objects(self, step: int, ranks: Iterable[int]) -> None:
        """Retire the objects of other ranks (replicas) that this rank is responsible for."""
        d = self.step_dir(step)
        (d / ids.COMMITTED_MARKER).unlink(missing_ok=True)
        for r in ranks:
            p = self.object_path(step, r)
            if p.exists():
                self.pool.release(p)
        self._remove_if_empty(d)

    def _remove_if_empty(self, d: Path) -> None:
        try:
            leftovers = [e.name for e in os.scandir(d)]
        except FileNotFoundError:
            return
        for name in leftovers:
            if name.startswith(f"{ids.COMMITTED_MARKER}.tmp."):
                continue
            return
        for name in leftovers:
            (d / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            d.rmdir()

    def close(self) -> None:
        self.pool.close()
