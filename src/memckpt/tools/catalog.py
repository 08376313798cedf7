"""An offline view of checkpoint trees, for operators and the CLI (no process group)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from memckpt import ids
from memckpt.core.reader import ObjectReader, TensorDamage
from memckpt.errors import CorruptCheckpointError, MemckptError

__all__ = ["ObjectSummary", "StepSummary", "find_jobs", "gc_job", "scan_job", "verify_job"]


@dataclass(frozen=True)
class ObjectSummary:
    rank: int
    path: Path
    size: int
    num_tensors: int = 0
    data_bytes: int = 0
    world_size: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class StepSummary:
    step: int
    committed: bool
    objects: tuple[ObjectSummary, ...] = field(default_factory=tuple)
    writing_ranks: tuple[int, ...] = ()

    @property
    def world_size(self) -> int | None:
        sizes = {o.world_size for o in self.objects if o.world_size is not None}
        return sizes.pop() if len(sizes) == 1 else None

    @property
    def complete(self) -> bool:
        """Every rank of the saved world has a readable object here."""
        ws = self.world_size
        good = {o.rank for o in self.objects if o.error is None}
        return ws is not None and good >= set(range(ws))

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)


def find_jobs(path: str | os.PathLike[str]) -> list[Path]:
    """Job directories at ``path``: ``path`` itself if it holds steps, else its children."""
    p = Path(path)
    if not p.is_dir():
        raise MemckptError(f"{p} is not a directory")

    def is_job(d: Path) -> bool:
        return (d / ids.POOL_DIR).is_dir() or any(
            ids.parse_step_dir(e.name) is not None for e in os.scandir(d)
        )

    if is_job(p):
        return [p]
    return sorted(d for d in p.iterdir() if d.is_dir() and is_job(d))


def _summarize_object(rank: int, path: Path) -> ObjectSummary:
    size = path.stat().st_size
    try:
        with ObjectReader(path) as r:
            idx = r.index
            return ObjectSummary(rank, path, size, len(idx.tensors), idx.data_bytes, idx.world_size)
    except (CorruptCheckpointError, OSError) as e:
        return ObjectSummary(rank, path, size, error=str(e))


def scan_job(job_dir: str | os.PathLike[str]) -> list[StepSummary]:
    """Every step of a job directory, oldest first, with its objects read and checked."""
    root = Path(job_dir)
    writing: dict[int, list[int]] = {}
    steps: list[int] = []
    for e in os.scandir(root):
        m = ids.parse_writing_marker(e.name)
        if m:
            writing.setdefault(m[0], []).append(m[1])
        s = ids.parse_step_dir(e.name)
        if s is not None and e.is_dir():
            steps.append(s)
    out = []
    for s in sorted(set(steps) | set(writing)):
        d = root / ids.step_dir_name(s)
        objs = []
        if d.is_dir():
            for e in sorted(os.scandir(d), key=lambda e: e.name):
                r = ids.parse_object_name(e.name)
                if r is not None:
                    objs.append(_summarize_object(r, Path(e.path)))
        out.append(
            StepSummary(
                step=s,
                committed=(d / ids.COMMITTED_MARKER).exists(),
                objects=tuple(sorted(objs, key=lambda o: o.rank)),
                writing_ranks=tuple(sorted(writing.get(s, []))),
            )
        )
    return out


def verify_job(
    job_dir: str | os.PathLike[str], step: int | None = None
) -> dict[Path, list[TensorDamage] | str]:
    """Re-hash every object (of ``step``, or all); map each object to its damage (or error)."""
    result: dict[Path, list[TensorDamage] | str] = {}
    for s in scan_job(job_dir):
        if step is not None and s.step != step:
            continue
        for o in s.objects:
            try:
                with ObjectReader(o.path) as r:
                    result[o.path] = r.verify()
            except (CorruptCheckpointError, OSError) as e:
                result[o.path] = str(e)
    return result


def gc_job(job_dir: str | os.PathLike[str], keep: int, dry_run: bool = False) -> list[int]:
    """Delete all but the newest ``keep`` complete steps; return the deleted steps.

    Steps newer than the newest complete one are left alone (a save may be running).
    Do not run it on a job whose saves are in flight on this node.
    """
    if keep < 1:
        raise MemckptError(f"--keep must be >= 1, got {keep}")
    steps = scan_job(job_dir)
    complete = [s.step for s in steps if s.complete]
    keep_set = set(complete[-keep:])
    newest = max(complete, default=-1)
    doomed = [s.step for s in steps if s.step not in keep_set and s.step < newest]
    if not dry_run:
        root = Path(job_dir)
        for s in doomed:
            d = root / ids.step_dir_name(s)
            (d / ids.COMMITTED_MARKER).unlink(missing_ok=True)
            shutil.rmtree(d, ignore_errors=True)
    return doomed
