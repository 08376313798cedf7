"""Draining committed memory checkpoints to persistent storage, in the background.

One thread per process writes drains in the order they were scheduled; the engine
keeps a draining step from retention until its drain ends. A drain is per rank: each
rank writes its own part from its node's copy, and the coordinator (rank 0) writes
the file that makes the destination loadable last, once every rank's part is there
(``wait_for_parts``), so a partial drain never looks complete.

``drain_objects`` is the format for ``CheckpointManager(persist_every=K)``: the step's
objects and manifest as a memckpt tree on a disk or shared filesystem, loadable with
``CheckpointManager(persist_dir, job_id)``. The DCP adapter drains to a plain DCP
directory with the same machinery.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from memckpt import ids
from memckpt.engine.save_engine import SaveEngine
from memckpt.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    MemckptError,
)
from memckpt.storage.manifest import write_manifest
from memckpt.storage.safe_fs import open_regular
from memckpt.storage.store import CheckpointStore, load_step_manifest, object_digest, step_dirs

__all__ = [
    "PART_WAIT_S",
    "check_persist",
    "drain_objects",
    "schedule_drain",
    "wait_for_drains",
    "wait_for_parts",
]

log = logging.getLogger(__name__)

PART_WAIT_S = 600.0
_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="memckpt-drain")


def check_persist(persist_every: object, persist_dir: object) -> None:
    """``persist_every`` needs an integer >= 1 and a ``persist_dir`` (ConfigError otherwise)."""
    if persist_every is None:
        return
    if not isinstance(persist_every, int) or isinstance(persist_every, bool) or persist_every < 1:
        raise ConfigError(f"persist_every must be an integer >= 1, got {persist_every!r}")
    if persist_dir is None:
        raise ConfigError("persist_every needs a persist_dir to drain to")


def schedule_drain(
    engine: SaveEngine, step: int, fn: Callable[[], None], what: str
) -> concurrent.futures.Future[None]:
    """Run ``fn`` on the drain thread; ``step`` is kept from retention until it ends."""
    engine.set_draining(step, True)

    def run() -> None:
        t0 = time.perf_counter()
        try:
            fn()
            log.info("rank %d: drained step %d to %s in %.2fs", engine.store.rank, step, what,
                     time.perf_counter() - t0)  # fmt: skip
        except Exception:
            log.exception("rank %d: drain of step %d to %s failed", engine.store.rank, step, what)
            raise
        finally:
            engine.set_draining(step, False)

    return _executor.submit(run)


def wait_for_drains(timeout: float | None = None) -> None:
    """Wait until every drain scheduled so far in this process has ended."""
    _executor.submit(lambda: None).result(timeout)


def wait_for_parts(paths: Sequence[Path], timeout: float = PART_WAIT_S) -> None:
    """Wait until every path exists (other ranks' parts on a shared filesystem)."""
    deadline = time.monotonic() + timeout
    for p in paths:
        while not p.exists():
            if time.monotonic() > deadline:
                raise MemckptError(f"{p} did not appear within {timeout:.0f}s; a rank's drain "
                                   "failed or its node cannot reach the destination")  # fmt: skip
            time.sleep(0.05)


def _copy_durably(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    fd = open_regular(src, "object")
    if fd is None:
        raise CheckpointNotFoundError(f"{src}: no object to drain")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover, or a link planted there: never written through
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    out_fd = os.open(tmp, flags, 0o644)
    with os.fdopen(fd, "rb") as fin, os.fdopen(out_fd, "wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dest)


def drain_objects(store: CheckpointStore, step: int, dest_base: Path, coordinator: bool) -> None:
    """Copy this rank's object of ``step`` to ``dest_base/<job>/step-<N>/``; the coordinator
    then writes the manifest once every rank's object is there."""
    manifest = store.manifest(step)
    if manifest is None:
        raise CheckpointNotFoundError(f"step {step} has no manifest on this node")
    dest = ids.JobLayout(dest_base, store.job_id)
    dest.step_dir(step).mkdir(parents=True, exist_ok=True)
    _copy_durably(store.object_path(step, store.rank), dest.object_path(step, store.rank))
    if coordinator:
        wait_for_parts([dest.object_path(step, r) for r in range(manifest.world_size)])
        write_manifest(dest.manifest_path(step), manifest, tag="drain.")


def persisted_steps(dest_base: Path, job_id: str) -> list[int]:
    """Steps drained completely to ``dest_base/<job>/`` (the manifest is written last), sorted."""
    layout = ids.JobLayout(dest_base, job_id)
    out = []
    for step in step_dirs(layout):
        try:
            m = load_step_manifest(layout, step)
        except CorruptCheckpointError as err:
            log.warning("ignoring drained step %d: %s", step, err)
            continue
        if m is not None:
            out.append(step)
    return sorted(out)


def persisted_object(dest_base: Path, job_id: str, step: int, rank: int) -> tuple[Path, int]:
    """(path, world size that saved it) of ``rank``'s drained object of ``step``, checked
    against the drained manifest's digest; CheckpointNotFoundError or CorruptCheckpointError."""
    layout = ids.JobLayout(dest_base, job_id)
    m = load_step_manifest(layout, step)
    if m is None:
        raise CheckpointNotFoundError(f"{layout.step_dir(step)}: no drained manifest")
    if rank not in m.objects:
        return layout.object_path(step, rank), m.world_size
    path = layout.object_path(step, rank)
    found = object_digest(path)
    if found is None or found[1] != m.objects[rank].digest:
        raise CorruptCheckpointError(f"{path}: not the object the drained manifest names")
    return path, m.world_size
