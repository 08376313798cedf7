"""An offline view of checkpoint trees, for operators and the CLI (no process group)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from memckpt import ids
from memckpt.errors import CorruptCheckpointError, MemckptError
from memckpt.storage.manifest import StepManifest
from memckpt.storage.reader import ObjectReader, TensorDamage
from memckpt.storage.retention import plan_retention
from memckpt.storage.safe_fs import is_real_dir, real_subdirs, remove_entry
from memckpt.storage.store import load_step_manifest

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
    digest: int | None = None


@dataclass(frozen=True)
class StepSummary:
    """One step as the scanned trees show it, judged by its manifest.

    ``committed``: a valid manifest exists (the step was globally committed), for this job
    and step: a manifest that names another job or step, is damaged, or is not a regular
    file does not count (``manifest_error`` says why), the same rule ``latest()`` applies.
    ``complete``: committed, and every rank's object the manifest names lies, valid, in
    the scanned trees; the same rule recovery applies to the live nodes. A node's own
    tree holds only its ranks and replicas, so scan every node's directory to judge a
    multi-node job (``memckpt ls node0/ node1/``), or see ``memckpt status``.
    """

    step: int
    committed: bool
    objects: tuple[ObjectSummary, ...] = field(default_factory=tuple)
    writing_ranks: tuple[int, ...] = ()
    manifest: StepManifest | None = None
    manifest_error: str | None = None

    @property
    def world_size(self) -> int | None:
        if self.manifest is not None:
            return self.manifest.world_size
        sizes = {o.world_size for o in self.objects if o.world_size is not None}
        return sizes.pop() if len(sizes) == 1 else None

    @property
    def present_ranks(self) -> list[int]:
        """Ranks whose object here is the one the manifest names (any valid one without it)."""
        m = self.manifest
        return sorted(
            {
                o.rank
                for o in self.objects
                if o.error is None
                and (m is None or (o.rank in m.objects and m.objects[o.rank].digest == o.digest))
            }
        )

    @property
    def missing_ranks(self) -> list[int]:
        ws = self.world_size
        return [] if ws is None else sorted(set(range(ws)) - set(self.present_ranks))

    @property
    def complete(self) -> bool:
        return self.committed and not self.missing_ranks

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)


def find_jobs(path: str | os.PathLike[str]) -> list[Path]:
    """Job directories at ``path``: ``path`` itself if it holds steps, else its children."""
    p = Path(path)
    if not p.is_dir():
        raise MemckptError(f"{p} is not a directory")

    def is_job(d: Path) -> bool:
        return is_real_dir(d / ids.POOL_DIR) or any(
            ids.parse_step_dir(e.name) is not None for e in real_subdirs(d)
        )

    if is_job(p):
        return [p]
    return sorted(Path(e.path) for e in real_subdirs(p) if is_job(Path(e.path)))


def _summarize_object(rank: int, path: Path) -> ObjectSummary:
    """One object as ls shows it; any fault of the object is its ``error``, never raised."""
    size = 0
    try:
        size = path.stat().st_size
        with ObjectReader(path) as r:
            idx = r.index
            return ObjectSummary(rank, path, size, len(idx.tensors), idx.data_bytes,
                                 idx.world_size, digest=r.header.digest)  # fmt: skip
    except (CorruptCheckpointError, OSError) as e:
        return ObjectSummary(rank, path, size, error=str(e))


def _scan_one(root: Path) -> tuple[dict[int, list[ObjectSummary]], dict[int, list[int]], set[int]]:
    writing: dict[int, list[int]] = {}
    steps: set[int] = set()
    if not is_real_dir(root):  # a missing node directory holds nothing; a symlink is not read
        return {}, writing, steps
    for e in os.scandir(root):
        m = ids.parse_writing_marker(e.name)
        if m:
            writing.setdefault(m[0], []).append(m[1])
        s = ids.parse_step_dir(e.name)
        if s is not None and e.is_dir(follow_symlinks=False):
            steps.add(s)
    objs: dict[int, list[ObjectSummary]] = {}
    for s in steps:
        d = root / ids.step_dir_name(s)
        for e in sorted(os.scandir(d), key=lambda e: e.name):
            r = ids.parse_object_name(e.name)
            if r is not None:
                objs.setdefault(s, []).append(_summarize_object(r, Path(e.path)))
    return objs, writing, steps


def scan_job(*job_dirs: str | os.PathLike[str]) -> list[StepSummary]:
    """Every step of one job, oldest first, over one or more node trees of it.

    Objects are read and checked; the manifest (from any tree that has a valid one)
    decides ``committed`` and ``complete``.
    """
    if not job_dirs:
        raise MemckptError("give at least one job directory")
    per_step: dict[int, list[ObjectSummary]] = {}
    writing: dict[int, list[int]] = {}
    steps: set[int] = set()
    manifests: dict[int, StepManifest] = {}
    errors: dict[int, str] = {}
    for jd in job_dirs:
        root = Path(jd)
        objs, wr, st = _scan_one(root)
        for s, lst in objs.items():
            per_step.setdefault(s, []).extend(lst)
        for s, ranks in wr.items():
            writing.setdefault(s, []).extend(ranks)
        steps |= st | set(wr)
        layout = _layout(root)
        for s in st:
            try:
                m = load_step_manifest(layout, s)
            except CorruptCheckpointError as e:
                errors.setdefault(s, str(e))
                continue
            if m is not None and (s not in manifests or m.created_unix > manifests[s].created_unix):
                manifests[s] = m
    return [
        StepSummary(
            step=s,
            committed=s in manifests,
            objects=tuple(sorted(per_step.get(s, []), key=lambda o: (o.rank, str(o.path)))),
            writing_ranks=tuple(sorted(set(writing.get(s, [])))),
            manifest=manifests.get(s),
            manifest_error=None if s in manifests else errors.get(s),
        )
        for s in sorted(steps)
    ]


def verify_job(
    job_dir: str | os.PathLike[str], step: int | None = None
) -> dict[Path, list[TensorDamage] | str]:
    """Re-hash every object (of ``step``, or all); map each object to its damage (or error)."""
    result: dict[Path, list[TensorDamage] | str] = {}
    for s in scan_job(job_dir):
        if step is not None and s.step != step:
            continue
        if s.manifest_error is not None:
            result[Path(job_dir) / ids.step_dir_name(s.step) / ids.MANIFEST_NAME] = s.manifest_error
        for o in s.objects:
            try:
                with ObjectReader(o.path) as r:
                    result[o.path] = r.verify()
            except (CorruptCheckpointError, OSError) as e:
                result[o.path] = str(e)
    return result


def _layout(job_dir: Path) -> ids.JobLayout:
    p = Path(os.path.abspath(job_dir))
    return ids.JobLayout(p.parent, p.name)


def gc_job(job_dir: str | os.PathLike[str], keep: int, dry_run: bool = False) -> list[int]:
    """Delete all but the newest ``keep`` loadable steps of one node's tree; return them.

    The same retention policy the engine runs, counting only steps that are complete in
    this tree (valid manifest for this job and step, every rank's object present and
    matching): a damaged or tampered newest step never makes gc delete the older steps
    that still load. Nothing newer than the newest complete step is touched (a save may
    be running). Do not run it on a job whose saves are in flight on this node.
    """
    if keep < 1:
        raise MemckptError(f"--keep must be >= 1, got {keep}")
    steps = scan_job(job_dir)
    plan = plan_retention(
        [s.step for s in steps], [s.step for s in steps if s.complete], keep_last=keep
    )
    if not dry_run:
        layout = _layout(Path(job_dir))
        for s in plan.delete:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(layout.manifest_path(s))  # first: the step never looks complete
            remove_entry(layout.step_dir(s))
    return list(plan.delete)
