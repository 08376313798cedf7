"""One node-local checkpoint tree: save lifecycle, publish-over, manifests, inventory, delete.

The layout is :class:`memckpt.ids.JobLayout`. A save: ``begin`` (marker) -> write into a
pool buffer -> ``commit_local`` (rename into the step directory, remove the marker)
-> global vote -> ``write_manifest`` + ``settle``, or ``rollback`` when the vote fails.

A crash at any instant leaves either no object or a complete one; an object file
exists under its final name only after its header (written last) is in place. A
re-save of a step whose object is committed publishes the new object over the old
one atomically and keeps the old one as ``rank-<r>.mck.prev`` until the new save is
globally committed (``settle``) or fails (``rollback``); a process that finds a
``.prev`` at start restores or drops it by the step's manifest. So a crash in the
middle of a re-save never loses the committed copy.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from memckpt import ids
from memckpt.errors import CorruptCheckpointError
from memckpt.storage.format import read_header
from memckpt.storage.inventory import ManifestInfo, StepHoldings
from memckpt.storage.manifest import StepManifest, read_manifest, write_manifest
from memckpt.storage.pool import Buffer, BufferPool
from memckpt.storage.safe_fs import (
    ensure_job_root,
    is_real_dir,
    open_regular,
    real_subdirs,
    remove_entry,
)

__all__ = [
    "CheckpointStore",
    "ObjectInfo",
    "delete_job",
    "load_step_manifest",
    "node_inventory",
    "object_digest",
    "step_dirs",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectInfo:
    """An object file present in the tree, with a header that validated."""

    step: int
    rank: int
    path: Path
    size: int
    digest: int = 0


def object_digest(path: Path) -> tuple[int, int] | None:
    """(file size, header digest) of an object file; None if absent.

    Raises CorruptCheckpointError on a bad header, UnsafePathError when the path is a
    symlink, FIFO or anything but a regular file.
    """
    fd = open_regular(path, "object")
    if fd is None:
        return None
    try:
        h = read_header(fd, str(path))
        return os.fstat(fd).st_size, h.digest
    finally:
        os.close(fd)


def step_dirs(layout: ids.JobLayout) -> list[int]:
    """Steps with a directory in the job's tree, oldest first.

    Only real directories count: a symlink named like a step (to a directory outside the
    job) is never listed, so nothing reads or deletes through it.
    """
    return sorted(
        s for e in real_subdirs(layout.root) if (s := ids.parse_step_dir(e.name)) is not None
    )


_step_dirs = step_dirs


def _step_entries(layout: ids.JobLayout, step: int) -> list[os.DirEntry[str]]:
    d = layout.step_dir(step)
    if not is_real_dir(d) or not is_real_dir(layout.root):
        return []
    try:
        return list(os.scandir(d))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _objects(layout: ids.JobLayout, step: int, validate: bool = True) -> list[ObjectInfo]:
    entries = _step_entries(layout, step)
    out = []
    for entry in entries:
        rank = ids.parse_object_name(entry.name)
        if rank is None:
            continue
        path = Path(entry.path)
        try:
            if validate:
                found = object_digest(path)
                if found is None:
                    continue
                out.append(ObjectInfo(step, rank, path, found[0], found[1]))
            elif entry.is_file(follow_symlinks=False):
                out.append(ObjectInfo(step, rank, path, entry.stat(follow_symlinks=False).st_size))
        except FileNotFoundError:
            continue
        except CorruptCheckpointError as e:
            log.warning("ignoring damaged object: %s", e)
    return sorted(out, key=lambda o: o.rank)


def load_step_manifest(layout: ids.JobLayout, step: int) -> StepManifest | None:
    """The manifest of ``step`` in this tree, by the one rule every reader applies.

    None when there is none. CorruptCheckpointError when it is damaged, is not a regular
    file in a real step directory, or describes another job or step (a copied or
    tampered manifest is never taken for this step's).
    """
    path = layout.manifest_path(step)
    if not is_real_dir(layout.step_dir(step)):
        return None
    m = read_manifest(path)
    if m is not None and (m.step != step or m.job_id != layout.job_id):
        raise CorruptCheckpointError(
            f"{path}: the manifest describes job {m.job_id!r} step {m.step}, not job "
            f"{layout.job_id!r} step {step}"
        )
    return m


def _manifest(layout: ids.JobLayout, step: int) -> StepManifest | None:
    try:
        return load_step_manifest(layout, step)
    except CorruptCheckpointError as e:
        log.warning("ignoring %s", e)
        return None


def _damage_marks(layout: ids.JobLayout, step: int) -> frozenset[int]:
    """Manifest checksums a load marked damaged in this step's directory (names only)."""
    entries = _step_entries(layout, step)
    return frozenset(c for e in entries if (c := ids.parse_damage_mark(e.name)) is not None)


def node_inventory(layout: ids.JobLayout) -> dict[int, StepHoldings]:
    """What one node's tree holds: per step, valid objects by digest, manifest, damage marks."""
    inv: dict[int, StepHoldings] = {}
    for step in _step_dirs(layout):
        objects = {o.rank: o.digest for o in _objects(layout, step)}
        m = _manifest(layout, step)
        if objects or m is not None:
            info = ManifestInfo.of(m) if m is not None else None
            inv[step] = StepHoldings(objects, info, _damage_marks(layout, step))
    return inv


def delete_job(layout: ids.JobLayout) -> None:
    """Delete one node's whole tree of a job: every step, buffer and peer file.

    Only once no process of the job runs on this node (close its runtimes first). Step
    manifests go first, so a node inventory taken meanwhile never counts a step complete
    whose objects are being deleted. Only what memckpt names is deleted (step
    directories, markers, its dot-directories), never through a symlink; a directory
    that still holds other files afterwards is kept (and logged), so a misnamed job
    never takes a user's files with it.
    """
    root = layout.root
    if not is_real_dir(root):
        if os.path.islink(root):
            log.warning("%s is a symlink, not a job's tree: removing the link only", root)
            remove_entry(root)
        return
    for step in step_dirs(layout):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(layout.manifest_path(step))
    for entry in list(os.scandir(root)):
        name = entry.name
        if (
            ids.parse_step_dir(name) is not None
            or ids.parse_writing_marker(name) is not None
            or name in (ids.POOL_DIR, ids.PEERS_DIR, ids.SIGNALS_DIR)
        ):
            remove_entry(entry.path)
    try:
        root.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        left = sorted(os.listdir(root))[:5]
        log.warning("kept %s: it holds files memckpt did not write (%s)", root, ", ".join(left))


class CheckpointStore:
    """The checkpoint tree of one job on one node, as seen by one rank."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        job_id: str,
        rank: int,
        limit_bytes: int | None = None,
    ) -> None:
        self.layout = ids.JobLayout(base_dir, job_id)
        self.base_dir = self.layout.base_dir
        self.job_id = self.layout.job_id
        self.rank = ids.validate_rank(rank)
        self.root = self.layout.root
        ensure_job_root(self.root)  # 0700, ours: the base may be a shared /dev/shm
        self.pool = BufferPool(self.layout.pool_dir, rank, limit_bytes)

    # -- paths ---------------------------------------------------------------------------
    def step_dir(self, step: int) -> Path:
        return self.layout.step_dir(step)

    def object_path(self, step: int, rank: int) -> Path:
        return self.layout.object_path(step, rank)

    def marker_path(self, step: int, rank: int) -> Path:
        return self.layout.marker_path(step, rank)

    # -- start of a process --------------------------------------------------------------
    def remove_stale_markers(self) -> list[int]:
        """Remove this rank's writing markers left by a crashed process; return their steps."""
        steps = []
        for entry in os.scandir(self.root):
            parsed = ids.parse_writing_marker(entry.name)
            if parsed and parsed[1] == self.rank:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                steps.append(parsed[0])
        if steps:
            log.info("rank %d: removed markers of interrupted saves of steps %s", self.rank, steps)
        return steps

    def settle_interrupted_resaves(self) -> list[tuple[int, int]]:
        """Finish re-saves a crash interrupted: keep whichever copy the manifest names.

        Returns the (step, rank) pairs whose committed copy was put back.
        """
        restored = []
        for step in _step_dirs(self.layout):
            d = self.step_dir(step)
            prevs = [e.name for e in os.scandir(d) if e.name.endswith(ids.PREV_SUFFIX)]
            if not prevs:
                continue
            m = _manifest(self.layout, step)
            for name in prevs:
                rank = ids.parse_object_name(name.removesuffix(ids.PREV_SUFFIX))
                if rank is None:
                    continue
                if self._matches(m, rank, d / name) and not self._matches(
                    m, rank, self.object_path(step, rank)
                ):
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(d / name, self.object_path(step, rank))
                        restored.append((step, rank))
                else:
                    (d / name).unlink(missing_ok=True)
        if restored:
            log.warning("rank %d: an interrupted re-save left its previous copies; restored %s",
                        self.rank, restored)  # fmt: skip
        return restored

    # -- save lifecycle ------------------------------------------------------------------
    def _make_step_dir(self, step: int) -> Path:
        """The step's directory, made a real one: a symlink or file in its place goes."""
        d = self.step_dir(step)
        if os.path.lexists(d) and not is_real_dir(d):
            log.warning("rank %d: removing %s: not a directory memckpt made", self.rank, d)
            remove_entry(d)
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o755)
        return d

    def begin(self, step: int) -> None:
        """Mark that this rank writes ``step``; nothing committed is touched."""
        self.marker_path(step, self.rank).touch()

    def _matches(self, m: StepManifest | None, rank: int, path: Path) -> bool:
        if m is None or rank not in m.objects:
            return False
        try:
            found = object_digest(path)
        except CorruptCheckpointError:
            return False
        return found is not None and found[1] == m.objects[rank].digest

    def _publish(self, step: int, rank: int, buf: Buffer) -> Path:
        self._make_step_dir(step)  # first: nothing below may go through a planted symlink
        final = self.object_path(step, rank)
        prev = self.layout.prev_object_path(step, rank)
        if os.path.lexists(final):
            if self._matches(_manifest(self.layout, step), rank, final):
                # committed: keep it reachable until the new copy is committed or rolled back
                self.pool.release(prev)
                os.link(final, prev)
            else:
                self.pool.release(final)  # uncommitted leftovers: reuse their pages
        for attempt in range(3):
            self._make_step_dir(step)
            try:
                os.rename(buf.path, final)
                break
            except FileNotFoundError:  # retention removed the empty step dir meanwhile
                if attempt == 2:
                    raise
        buf.path = final
        self.pool.track_in_use(buf)
        return final

    def commit_local(self, step: int, buf: Buffer) -> Path:
        """Atomically publish a fully written buffer as this rank's object for ``step``."""
        final = self._publish(step, self.rank, buf)
        self.marker_path(step, self.rank).unlink(missing_ok=True)
        return final

    def adopt(self, step: int, rank: int, buf: Buffer) -> Path:
        """Publish a verified object of ``rank`` (a replica, or a copy fetched from a peer).

        The buffer's file is renamed to its final name in one step, so a partial copy is
        never visible; a committed copy it replaces is kept until ``settle``.
        """
        return self._publish(step, rank, buf)

    def abort(self, step: int, buf: Buffer | None) -> None:
        """Undo a failed save before its local commit: free its buffer, remove the marker."""
        if buf is not None:
            self.pool.give_back(buf)
        self.marker_path(step, self.rank).unlink(missing_ok=True)

    def write_manifest(self, manifest: StepManifest) -> None:
        """Record the global commit of ``manifest.step`` in this node's tree (atomic)."""
        self._make_step_dir(manifest.step)
        write_manifest(self.layout.manifest_path(manifest.step), manifest, tag=f"{self.rank}.")

    def manifest(self, step: int) -> StepManifest | None:
        """The step's manifest in this tree; None when absent or damaged (logged)."""
        return _manifest(self.layout, step)

    def settle(self, step: int, ranks: Iterable[int]) -> None:
        """After the global commit of a re-save: retire the replaced copies of ``ranks``."""
        for r in ranks:
            self.pool.release(self.layout.prev_object_path(step, r))

    def rollback(self, step: int, ranks: Iterable[int]) -> None:
        """A save of ``step`` failed its vote: put back what the manifest names, drop the rest.

        For each of ``ranks`` (this rank and the replicas it holds): a replaced committed
        copy comes back; an object the manifest does not name is deleted.
        """
        m = _manifest(self.layout, step)
        for r in ranks:
            final = self.object_path(step, r)
            prev = self.layout.prev_object_path(step, r)
            if prev.exists():
                self.pool.forget(final)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(prev, final)
            elif final.exists() and not self._matches(m, r, final):
                self.pool.release(final)
        self.marker_path(step, self.rank).unlink(missing_ok=True)
        self._remove_if_empty(self.step_dir(step))

    # -- damage found by loads -------------------------------------------------------------
    def mark_damaged(self, step: int, manifest_checksum: int, detail: str) -> None:
        """Record that the step with this manifest has data damaged on every holder.

        Inventories report the mark, so the recovery plan of every rank and of every later
        restart passes over the step. A re-save writes a new manifest, which the mark
        does not name.
        """
        path = self.layout.damage_mark_path(step, manifest_checksum)
        try:
            # O_EXCL: never opens what is there (a planted FIFO would block the open)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return
        except OSError as e:
            log.warning("rank %d: cannot mark step %d damaged at %s: %s", self.rank, step, path, e)
            return
        try:
            os.write(fd, detail.encode()[:4096])
        finally:
            os.close(fd)

    def set_aside_damaged(self, step: int, rank: int, digest: int) -> bool:
        """Rename this node's copy of ``rank``'s object aside when its data failed verification.

        Only the copy whose header digest is ``digest`` (the one that was read) moves, so a
        good copy published meanwhile stays; the inventory then stops offering it and
        re-replication puts a good copy back. Returns whether a copy moved.
        """
        path = self.object_path(step, rank)
        try:
            found = object_digest(path)
        except CorruptCheckpointError:
            found = None
        if found is None or found[1] != digest:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.pool.forget(path)
            os.rename(path, self.layout.damaged_object_path(step, rank))
            log.warning("rank %d: set aside %s: its data failed verification", self.rank, path)
            return True
        return False

    # -- inventory -----------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps that have a directory in this tree, oldest first."""
        return _step_dirs(self.layout)

    def objects(self, step: int, validate: bool = True) -> list[ObjectInfo]:
        """Objects of ``step`` in this tree; with ``validate``, only those whose header checks."""
        return _objects(self.layout, step, validate)

    def committed_steps(self, rank: int | None = None) -> list[int]:
        """Steps with a manifest whose object of ``rank`` (default: this rank) is here, valid."""
        rank = self.rank if rank is None else rank
        out = []
        for step in self.steps():
            m = _manifest(self.layout, step)
            if m is not None and self._matches(m, rank, self.object_path(step, rank)):
                out.append(step)
        return out

    def inventory(self) -> dict[int, StepHoldings]:
        """Per step: the objects this tree holds (rank -> digest) and its manifest."""
        return node_inventory(self.layout)

    def newest_object_size(self) -> int | None:
        """Size of this rank's newest object in the tree (a hint for pre-faulting)."""
        for step in reversed(self.steps()):
            try:
                return os.lstat(self.object_path(step, self.rank)).st_size
            except FileNotFoundError:
                continue
        return None

    # -- retention -----------------------------------------------------------------------
    def delete_step(self, step: int, ranks: Iterable[int] = ()) -> None:
        """Retire ``step``: its manifest first, then this rank's object and those of ``ranks``.

        The manifest goes first so the step never looks complete while it is being taken
        apart; buffers go back to the pool; the directory goes with its last object.
        """
        d = self.step_dir(step)
        if not is_real_dir(d):  # a planted symlink: remove the link, never what it points to
            remove_entry(d)
            return
        self.layout.manifest_path(step).unlink(missing_ok=True)
        for r in {self.rank, *ranks}:
            self.pool.release(self.layout.prev_object_path(step, r))
            self.pool.release(self.object_path(step, r))
        self._remove_if_empty(d)

    def _remove_if_empty(self, d: Path) -> None:
        if not is_real_dir(d):
            return
        try:
            names = [e.name for e in os.scandir(d)]
        except (FileNotFoundError, NotADirectoryError):
            return
        if any(ids.parse_object_name(n.removesuffix(ids.PREV_SUFFIX)) is not None for n in names):
            return
        for name in names:  # marks, set-aside copies, whatever else: the step is gone
            remove_entry(d / name)
        with contextlib.suppress(OSError):
            d.rmdir()

    def close(self) -> None:
        self.pool.close()
