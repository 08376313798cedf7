"""An offline view of checkpoint trees, for operators and the CLI (no process group).

Every verdict speaks one vocabulary (:class:`Condition`): ``ok``, ``damaged: <what>``
or ``missing``. ``ls``, ``verify``, ``inspect`` and ``status`` all render it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from memckpt import ids
from memckpt.errors import CorruptCheckpointError, MemckptError
from memckpt.storage.durability import NONE, PersistedRecord, read_persisted_record, tier_of
from memckpt.storage.manifest import StepManifest
from memckpt.storage.reader import ObjectReader, TensorDamage
from memckpt.storage.retention import plan_retention
from memckpt.storage.safe_fs import is_real_dir, read_regular, real_subdirs, remove_entry
from memckpt.storage.statedict import restore_state_dict
from memckpt.storage.store import load_step_manifest
from memckpt.tools.tables import CommandError

__all__ = [
    "DAMAGED",
    "MISSING",
    "OK",
    "Condition",
    "DamageMark",
    "JobsFound",
    "NonTensorEntry",
    "ObjectSummary",
    "StepSummary",
    "damage_detail",
    "find_jobs",
    "find_jobs_across",
    "gc_job",
    "non_tensor_entries",
    "scan_job",
    "steps_in",
    "verify_job",
]

OK: Final = "ok"
DAMAGED: Final = "damaged"
MISSING: Final = "missing"

_MAX_MARK_BYTES: Final = 8192  # a load writes at most 4096 bytes of detail into a mark


@dataclass(frozen=True)
class Condition:
    """A verdict on an object, a rank of a step or a file: ``ok``, ``damaged`` or ``missing``.

    ``detail`` says what is damaged (``checksum mismatch in tensor 'w' chunk 0``) or where
    a copy is missing; ``str()`` gives ``damaged: <detail>``, the form every command prints.
    """

    state: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.state}: {self.detail}" if self.detail else self.state

    def as_dict(self) -> dict[str, str]:
        return {"state": self.state, "detail": self.detail}

    @property
    def ok(self) -> bool:
        return self.state == OK


def damage_detail(error: BaseException | str, path: str | os.PathLike[str] | None = None) -> str:
    """What is damaged, without the path the row already names (``header checksum mismatch``)."""
    text = str(error)
    if path is not None:
        text = text.removeprefix(f"{path}: ")
    return text


def _tensor_damage(found: Sequence[TensorDamage]) -> str:
    shown = "; ".join(str(d) for d in found[:5])
    more = f" and {len(found) - 5} more chunks" if len(found) > 5 else ""
    return f"checksum mismatch in {shown}{more}"


@dataclass(frozen=True)
class ObjectSummary:
    """One object file as read (header, index, non-tensor part; the data when verified)."""

    rank: int
    path: Path
    size: int  # bytes of the file: a pool buffer, often larger than what it holds
    num_tensors: int = 0
    data_bytes: int = 0  # tensor bytes it holds
    world_size: int | None = None
    error: str | None = None  # what is damaged; None when every check passed
    digest: int | None = None

    @property
    def condition(self) -> Condition:
        return Condition(OK) if self.error is None else Condition(DAMAGED, self.error)


@dataclass(frozen=True)
class DamageMark:
    """A mark a load left in a step directory: the step with this manifest did not load.

    ``damaged.<checksum>`` (every holder's copy failed its checksums) or a copy set aside as
    ``rank-<r>.mck.damaged``; ``rank`` is None for a step mark.
    """

    path: Path
    rank: int | None = None
    checksum: int | None = None
    detail: str = ""

    @property
    def condition(self) -> Condition:
        if self.rank is not None:
            what = f"copy of rank {self.rank} set aside by a load: its data failed its checksums"
        else:
            what = "a load found this step's data damaged on every holder"
        return Condition(DAMAGED, f"{what} ({self.path.name})")


@dataclass(frozen=True)
class StepSummary:
    """One step as the scanned trees show it, judged by its manifest.

    ``committed``: a valid manifest exists (the step was globally committed), for this job
    and step: a manifest that names another job or step, is damaged, or is not a regular
    file does not count (``manifest_error`` says why), the same rule ``latest()`` applies.
    ``complete``: committed, every rank's object the manifest names lies, valid, in the
    scanned trees, and no load marked the step damaged; the same rule recovery applies to
    the live nodes. A node's own tree holds only its ranks and replicas, so scan every
    node's directory to judge a multi-node job (``memckpt ls node0/ node1/``), or see
    ``memckpt status``.

    ``persisted``: a drain's record in one of the trees that this manifest's step is
    persisted (``memckpt.storage.durability``); ``durability`` and ``copies`` follow.
    """

    step: int
    committed: bool
    objects: tuple[ObjectSummary, ...] = field(default_factory=tuple)
    writing_ranks: tuple[int, ...] = ()
    manifest: StepManifest | None = None
    manifest_error: str | None = None
    marks: tuple[DamageMark, ...] = ()
    manifest_path: Path | None = None  # the damaged manifest ``manifest_error`` is about
    persisted: PersistedRecord | None = None

    @property
    def world_size(self) -> int | None:
        if self.manifest is not None:
            return self.manifest.world_size
        sizes = {o.world_size for o in self.objects if o.world_size is not None}
        return sizes.pop() if len(sizes) == 1 else None

    def _is_committed_copy(self, o: ObjectSummary) -> bool:
        m = self.manifest
        return m is None or (o.rank in m.objects and m.objects[o.rank].digest == o.digest)

    def object_condition(self, o: ObjectSummary) -> Condition:
        """``o``'s verdict against this step: damaged too when it is not the copy committed."""
        if o.error is None and not self._is_committed_copy(o):
            return Condition(
                DAMAGED,
                "not the committed copy: its header digest differs from the step manifest's "
                "(a re-save in progress, or a replaced file)",
            )
        return o.condition

    def rank_conditions(self) -> dict[int, Condition]:
        """Each rank's verdict: ``ok`` (a good copy), ``damaged`` (only bad ones), ``missing``."""
        ws = self.world_size
        ranks = set(range(ws)) if ws is not None else set()
        ranks |= {o.rank for o in self.objects}
        out: dict[int, Condition] = {}
        for r in sorted(ranks):
            copies = [self.object_condition(o) for o in self.objects if o.rank == r]
            bad = [c for c in copies if not c.ok]
            if any(c.ok for c in copies):
                out[r] = Condition(OK)
            elif bad:
                out[r] = bad[0]
            else:
                out[r] = Condition(MISSING, "no copy in the scanned trees")
        return out

    @property
    def present_ranks(self) -> list[int]:
        """Ranks with a valid copy of the object the manifest names (any valid one without it)."""
        return [r for r, c in self.rank_conditions().items() if c.ok]

    @property
    def missing_ranks(self) -> list[int]:
        """Ranks of the saving world with no copy at all in the scanned trees."""
        return [r for r, c in self.rank_conditions().items() if c.state == MISSING]

    @property
    def damaged_ranks(self) -> list[int]:
        """Ranks whose copies here are all damaged (or not the committed ones)."""
        return [r for r, c in self.rank_conditions().items() if c.state == DAMAGED]

    @property
    def step_marks(self) -> list[DamageMark]:
        """Marks that a load found this step (as its manifest now stands) damaged everywhere."""
        m = self.manifest
        return [
            k for k in self.marks if k.rank is None and m is not None and k.checksum == m.checksum
        ]

    @property
    def complete(self) -> bool:
        ws = self.world_size
        present = set(self.present_ranks)
        return (
            self.committed
            and ws is not None
            and all(r in present for r in range(ws))
            and not self.step_marks
        )

    @property
    def loadable_here(self) -> bool:
        """Committed, not marked damaged, and every copy of it in these trees is good.

        Ranks with no copy here may live on other nodes (a node's tree of a multi-node
        job): what gc counts as a committed step, so that a damaged or tampered step never
        makes it delete the older steps.
        """
        return self.committed and not self.step_marks and not self.damaged_ranks

    @property
    def damage(self) -> list[tuple[Path, Condition]]:
        """Everything damaged about this step, by path: manifest, copies, marks of loads."""
        found: list[tuple[Path, Condition]] = []
        if self.manifest_error is not None:
            path = self.manifest_path or Path(ids.MANIFEST_NAME)
            found.append((path, Condition(DAMAGED, damage_detail(self.manifest_error, path))))
        found += [(o.path, c) for o in self.objects if not (c := self.object_condition(o)).ok]
        marks = self.step_marks
        found += [(k.path, k.condition) for k in self.marks if k.rank is not None or k in marks]
        return found

    @property
    def copies(self) -> int:
        """Good copies of the least-held rank's committed object, one per scanned tree (a
        node); 0 when some rank has none here, the step is not committed or is marked."""
        ws = self.world_size
        if not self.committed or ws is None or self.step_marks:
            return 0
        trees: dict[int, set[Path]] = {}
        for o in self.objects:
            if self.object_condition(o).ok:
                trees.setdefault(o.rank, set()).add(o.path.parent.parent)
        return min((len(trees.get(r, ())) for r in range(ws)), default=0)

    @property
    def durability(self) -> str:
        """``persisted``, ``replicated`` (2+ copies here), ``local`` or ``none``."""
        if not self.committed:
            return NONE
        return tier_of(self.copies, self.persisted is not None)

    def durability_doc(self, copies: int | None = None) -> dict[str, object]:
        """The JSON form: tier, copies (the given count, else ``self.copies``), persisted."""
        n = self.copies if copies is None else copies
        tier = tier_of(n, self.persisted is not None) if self.committed else NONE
        rec = None if self.persisted is None else self.persisted.as_dict()
        return {"tier": tier, "copies": n, "persisted": rec}

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def data_bytes(self) -> int:
        return sum(o.data_bytes for o in self.objects)


@dataclass(frozen=True)
class JobsFound:
    """Jobs under some paths (one path per node) and the paths that hold none."""

    jobs: dict[str, list[Path]]  # job name -> its directory under each path that has it
    empty: dict[str, str]  # path -> why it holds nothing ("no such directory", "holds no job")


def _is_job(d: Path) -> bool:
    return is_real_dir(d / ids.POOL_DIR) or any(
        ids.parse_step_dir(e.name) is not None for e in real_subdirs(d)
    )


def find_jobs(path: str | os.PathLike[str]) -> list[Path]:
    """Job directories at ``path``: ``path`` itself if it holds steps, else its children."""
    p = Path(path)
    if not p.is_dir():
        what = "does not exist" if not os.path.lexists(p) else "is not a directory"
        raise CommandError(
            f"{p} {what}: give a job directory (base_dir/job_id) or a base directory"
        )
    if _is_job(p):
        return [p]
    return sorted(Path(e.path) for e in real_subdirs(p) if _is_job(Path(e.path)))


def find_jobs_across(paths: Sequence[str | os.PathLike[str]]) -> JobsFound:
    """Jobs under each of ``paths`` (one per node); a missing or empty path holds nothing.

    Raises CommandError when a path is something other than a directory, or when no path
    holds any job.
    """
    jobs: dict[str, list[Path]] = {}
    empty: dict[str, str] = {}
    for p in paths:
        if not os.path.lexists(p):
            empty[str(p)] = "no such directory"
            continue
        found = find_jobs(p)
        if not found:
            empty[str(p)] = "holds no job"
        for job in found:
            jobs.setdefault(job.name, []).append(job)
    if not jobs:
        shown = "; ".join(f"{p}: {why}" for p, why in empty.items())
        raise CommandError(
            f"no memckpt job found ({shown}): a job directory holds step-N/ directories; "
            "give a node's memory base directory (checkpoint base_dir, e.g. /dev/shm/memckpt) "
            "or a job directory"
        )
    return JobsFound(jobs, empty)


def steps_in(*job_dirs: str | os.PathLike[str]) -> list[int]:
    """Steps with a directory in any of the trees, oldest first (nothing is read)."""
    found: set[int] = set()
    for jd in job_dirs:
        if is_real_dir(jd):
            found |= {s for e in real_subdirs(jd) if (s := ids.parse_step_dir(e.name)) is not None}
    return sorted(found)


@dataclass(frozen=True)
class NonTensorEntry:
    """A value of a state dict that is not a tensor (``step``, ``meta.lr``), for display."""

    name: str
    type: str
    value: str  # a short repr


_MAX_REPR = 80


class _TensorRef:
    """Stands in for a stored tensor while the skeleton is read for display."""

    def __init__(self, i: int) -> None:
        self.i = i


def _short(v: object) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return f"<{len(v)} bytes>"
    text = repr(v)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _walk(v: object, name: str, out: list[NonTensorEntry], limit: int) -> None:
    if len(out) >= limit or isinstance(v, _TensorRef):
        return
    if isinstance(v, dict) and v:
        for k, x in v.items():
            key = k if isinstance(k, str) else repr(k)
            _walk(x, f"{name}.{key}" if name else key, out, limit)
    elif isinstance(v, (list, tuple)) and v and any(not isinstance(x, _TensorRef) for x in v):
        for i, x in enumerate(v):
            _walk(x, f"{name}.{i}" if name else str(i), out, limit)
    elif not isinstance(v, (list, tuple)) or not v:
        out.append(NonTensorEntry(name or "(root)", type(v).__name__, _short(v)))


def non_tensor_entries(reader: ObjectReader, limit: int = 10_000) -> list[NonTensorEntry]:
    """The non-tensor values of an object (its first ``limit``), read by the restricted loader.

    The skeleton is restored as a load restores it, with no global beyond those a load
    allows (no code of the object's runs). Raises UnsupportedValueError when it names a
    class that is not allowed (a load needs ``safe_globals`` for it), CorruptCheckpointError
    when it is damaged.
    """
    n = len(reader.index.tensors)

    def ref(i: int) -> object:
        if not 0 <= i < n:
            raise CorruptCheckpointError(f"{reader.where}: tensor reference {i} out of range")
        return _TensorRef(i)

    restored = restore_state_dict(reader.skeleton, ref, (), where=reader.where)  # type: ignore[arg-type]
    out: list[NonTensorEntry] = []
    _walk(restored, "", out, limit)
    return out


def _verify(reader: ObjectReader) -> str | None:
    damage = reader.verify()
    return _tensor_damage(damage) if damage else None


def _summarize_object(rank: int, path: Path, verify: bool) -> ObjectSummary:
    """One object as read; any fault of the object is its ``error``, never raised."""
    size = 0
    try:
        size = path.stat().st_size
        with ObjectReader(path) as r:
            idx = r.index
            error = _verify(r) if verify else None
            return ObjectSummary(rank, path, size, len(idx.tensors), idx.data_bytes,
                                 idx.world_size, error, r.header.digest)  # fmt: skip
    except (CorruptCheckpointError, OSError) as e:
        return ObjectSummary(rank, path, size, error=damage_detail(e, path))


def _read_mark(path: Path, rank: int | None, checksum: int | None) -> DamageMark:
    detail = ""
    if rank is None:
        try:
            raw = read_regular(path, _MAX_MARK_BYTES, "damage mark")
            detail = (raw or b"").decode("utf-8", "replace").strip()
        except (OSError, CorruptCheckpointError) as e:
            detail = f"unreadable: {damage_detail(e, path)}"
    return DamageMark(path, rank, checksum, detail)


def _scan_step(d: Path, verify: bool) -> tuple[list[ObjectSummary], list[DamageMark]]:
    objs: list[ObjectSummary] = []
    marks: list[DamageMark] = []
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):  # deleted meanwhile (gc, retention)
        return objs, marks
    for e in entries:
        r = ids.parse_object_name(e.name)
        if r is not None:
            objs.append(_summarize_object(r, Path(e.path), verify))
            continue
        aside = ids.parse_object_name(e.name.removesuffix(ids.DAMAGED_SUFFIX))
        if e.name.endswith(ids.DAMAGED_SUFFIX) and aside is not None:
            marks.append(_read_mark(Path(e.path), aside, None))
        elif (c := ids.parse_damage_mark(e.name)) is not None:
            marks.append(_read_mark(Path(e.path), None, c))
    return objs, marks


def scan_job(
    *job_dirs: str | os.PathLike[str], verify: bool = False, steps: Collection[int] | None = None
) -> list[StepSummary]:
    """Every step of one job (or those in ``steps``), oldest first, over its node trees.

    Headers, indexes and non-tensor parts are read and checked; with ``verify`` every
    tensor chunk is re-hashed too (reads all the data). The manifest (from any tree that
    has a valid one) decides ``committed`` and ``complete``. A missing directory holds
    nothing.
    """
    if not job_dirs:
        raise MemckptError("give at least one job directory")
    per_step: dict[int, list[ObjectSummary]] = {}
    marks: dict[int, list[DamageMark]] = {}
    writing: dict[int, list[int]] = {}
    found: set[int] = set()
    manifests: dict[int, StepManifest] = {}
    errors: dict[int, tuple[str, Path]] = {}
    roots: list[Path] = []
    for jd in job_dirs:
        root = Path(jd)
        if not is_real_dir(root):  # a missing node directory holds nothing; a symlink is not read
            continue
        roots.append(root)
        here: set[int] = set()
        for e in os.scandir(root):
            m = ids.parse_writing_marker(e.name)
            if m and (steps is None or m[0] in steps):
                writing.setdefault(m[0], []).append(m[1])
                found.add(m[0])
            s = ids.parse_step_dir(e.name)
            if s is not None and e.is_dir(follow_symlinks=False) and (steps is None or s in steps):
                here.add(s)
        found |= here
        layout = _layout(root)
        for s in here:
            objs, mk = _scan_step(root / ids.step_dir_name(s), verify)
            per_step.setdefault(s, []).extend(objs)
            marks.setdefault(s, []).extend(mk)
            try:
                man = load_step_manifest(layout, s)
            except CorruptCheckpointError as e:
                errors.setdefault(s, (str(e), layout.manifest_path(s)))
                continue
            if man is not None and (
                s not in manifests or man.created_unix > manifests[s].created_unix
            ):
                manifests[s] = man
    return [
        StepSummary(
            step=s,
            committed=s in manifests,
            objects=tuple(sorted(per_step.get(s, []), key=lambda o: (o.rank, str(o.path)))),
            writing_ranks=tuple(sorted(set(writing.get(s, [])))),
            manifest=manifests.get(s),
            manifest_error=None if s in manifests or s not in errors else errors[s][0],
            marks=tuple(marks.get(s, [])),
            manifest_path=None if s in manifests or s not in errors else errors[s][1],
            persisted=_persisted(roots, s, manifests.get(s)),
        )
        for s in sorted(found)
    ]


def _persisted(roots: Sequence[Path], step: int, m: StepManifest | None) -> PersistedRecord | None:
    """The first tree's record that ``step``, with manifest ``m``, is persisted."""
    if m is None:
        return None
    for root in roots:
        rec = read_persisted_record(root, step, m.checksum)
        if rec is not None:
            return rec
    return None


def verify_job(job_dir: str | os.PathLike[str], step: int | None = None) -> dict[Path, str | None]:
    """Re-hash every object (of ``step``, or all) of one tree; map each to what is damaged.

    None for an object that passed; a damaged manifest is listed under its own path.
    """
    result: dict[Path, str | None] = {}
    for s in scan_job(job_dir, verify=True, steps=None if step is None else {step}):
        if s.manifest_error is not None:
            path = Path(job_dir) / ids.step_dir_name(s.step) / ids.MANIFEST_NAME
            result[path] = damage_detail(s.manifest_error, path)
        for o in s.objects:
            c = s.object_condition(o)
            result[o.path] = None if c.ok else c.detail
    return result


def _layout(job_dir: Path) -> ids.JobLayout:
    p = Path(os.path.abspath(job_dir))
    return ids.JobLayout(p.parent, p.name)


def gc_job(job_dir: str | os.PathLike[str], keep: int, dry_run: bool = False) -> list[int]:
    """Delete all but the newest ``keep`` loadable steps of one node's tree; return them.

    The same retention policy the engine runs, counting only steps loadable as far as
    this tree can tell (``StepSummary.loadable_here``: a valid manifest for this job and
    step, no damage mark, every copy here the one the manifest names; ranks held by other
    nodes are not judged): a damaged or tampered newest step never makes gc delete the
    older steps that still load, and the newest finite step is kept ahead of steps saved
    holding NaN/Inf. Nothing newer than the newest such step is touched (a save may be
    running). Do not run it on a job whose saves are in flight on this node.
    """
    if keep < 1:
        raise CommandError(f"--keep must be >= 1 (complete steps to keep), got {keep}")
    steps = scan_job(job_dir)
    plan = plan_retention(
        [s.step for s in steps],
        [s.step for s in steps if s.loadable_here],
        keep_last=keep,
        non_finite=[s.step for s in steps if s.manifest is not None and not s.manifest.finite],
    )
    if not dry_run:
        layout = _layout(Path(job_dir))
        for s in plan.delete:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(layout.manifest_path(s))  # first: the step never looks complete
            remove_entry(layout.step_dir(s))
    return list(plan.delete)
