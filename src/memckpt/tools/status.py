"""Where a job's data lives across nodes, what is at risk, and what a restart would do.

Reads node directories offline (``memckpt status``): each path is one node's base
directory (or its job directory). A missing or empty directory is a node with nothing
on it: a lost node, or one replaced by an empty machine. For each step and rank the
report says which nodes hold a copy and in what condition (``ok``, ``damaged: <what>``,
or ``missing`` where the replication plan keeps one), whether the rank is at risk (one
good copy left) or lost, whether the step can still be recovered, and the plan a
restart would run: the same pure ``plan_recovery`` the ranks run (fetching allowed, as
every load allows it), over inventories read from the trees.

The trees on disk are the truth for what is held. The peer files
(``<job>/.peers/rank-<r>.json``, written by replicated jobs) only say which node each
rank runs on and where the replication plan keeps copies; without them a rank's node is
the one node that holds its objects.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memckpt import ids
from memckpt.engine.load_transaction import resolve_on_non_finite
from memckpt.engine.recovery_plan import NON_FINITE_REASON, RecoveryPlan, plan_recovery
from memckpt.errors import CorruptCheckpointError
from memckpt.storage.inventory import ManifestInfo, StepHoldings
from memckpt.storage.last_save import read_last_saves
from memckpt.storage.pool import free_bytes
from memckpt.storage.room import Room, cgroup_memory, shortfall
from memckpt.storage.safe_fs import is_real_dir, read_regular, real_subdirs
from memckpt.tools.catalog import (
    MISSING,
    Condition,
    ObjectSummary,
    StepSummary,
    find_jobs,
    scan_job,
)
from memckpt.tools.tables import EXIT_DAMAGE, EXIT_OK, CommandError

__all__ = ["AT_RISK", "LOST", "CopyView", "JobStatus", "NodeView", "RankView", "StepView",
           "job_status"]  # fmt: skip

log = logging.getLogger(__name__)

AT_RISK = "at risk"
LOST = "lost"

# NodeView.state
HOLDS_JOB = "holds the job"
EMPTY = "empty"
NO_DIR = "no such directory"
NOT_GIVEN = "not given"


@dataclass(frozen=True)
class NodeView:
    """One node: a directory given on the command line, or one the peer files name."""

    label: str
    path: str | None  # as given; None for a node named only by the peer files
    job_dir: str | None  # the job's tree on it, when there is one
    state: str  # HOLDS_JOB, EMPTY, NO_DIR or NOT_GIVEN (each but the first holds nothing)
    ranks: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.label, "path": self.path, "dir": self.job_dir,
                "state": self.state, "ranks": list(self.ranks)}  # fmt: skip


@dataclass(frozen=True)
class CopyView:
    """One node's copy of one rank's object of one step (``missing``: planned, not there)."""

    node: int
    condition: Condition
    path: str | None = None


@dataclass(frozen=True)
class RankView:
    """One rank of one step: its copies and its risk (``ok``, ``at risk`` or ``lost``)."""

    rank: int
    copies: tuple[CopyView, ...]
    expected: int | None  # copies the replication plan keeps; None when no plan is recorded
    state: str

    @property
    def good(self) -> int:
        return sum(c.condition.ok for c in self.copies)


@dataclass(frozen=True)
class StepView:
    """One step over all nodes: its verdicts and whether a restart could load it."""

    summary: StepSummary
    ranks: tuple[RankView, ...]
    plan: RecoveryPlan  # planned for this step alone; plan.step is None when it cannot load

    @property
    def step(self) -> int:
        return self.summary.step

    @property
    def recoverable(self) -> bool:
        return self.plan.step == self.step

    @property
    def copies(self) -> int:
        """Good copies of the least-held rank's data over the nodes (0: a rank is lost)."""
        return min((r.good for r in self.ranks), default=0) if self.summary.committed else 0

    @property
    def durability(self) -> dict[str, Any]:
        """``{"tier", "copies", "persisted"}`` (``memckpt.storage.durability``)."""
        return self.summary.durability_doc(self.copies)

    @property
    def why_not(self) -> str:
        if self.recoverable:
            return ""
        return self.plan.skipped.get(self.step, "not recoverable")


@dataclass
class JobStatus:
    job_id: str
    nodes: list[NodeView]
    world_size: int
    strategy: str | None
    rank_node: dict[int, int | None]  # rank -> index into nodes (None: unknown)
    holder_node: list[int | None]  # plan holder index -> node index
    steps: list[StepView]  # oldest first
    plan: RecoveryPlan  # what a restart would load
    checked: str  # "headers" or "data"
    addresses: dict[int, str] = field(default_factory=dict)

    def label(self, node: int | None) -> str:
        return "?" if node is None else self.nodes[node].label

    def source(self, rank: int, plan: RecoveryPlan | None = None) -> tuple[int | None, bool]:
        """(node, local) that rank's data comes from under ``plan`` (default: the restart's)."""
        h = (plan or self.plan).sources[rank]
        node = self.holder_node[h] if h < len(self.holder_node) else None
        return node, node is not None and node == self.rank_node.get(rank)

    def at(self, state: str) -> list[tuple[int, int]]:
        """(step, rank) pairs of committed steps whose rank is in ``state``, newest first."""
        return [(v.step, r.rank) for v in reversed(self.steps) if v.summary.committed
                for r in v.ranks if r.state == state]  # fmt: skip

    @property
    def damage(self) -> list[tuple[int, Path, Condition]]:
        """(step, path, verdict) of everything damaged: copies, manifests, marks of loads."""
        return [(v.step, p, c) for v in self.steps for p, c in v.summary.damage]

    @property
    def exit_code(self) -> int:
        """1 when nothing can be recovered or something is damaged, else 0."""
        return EXIT_DAMAGE if self.plan.step is None or self.damage else EXIT_OK

    def _sources(self, plan: RecoveryPlan) -> dict[str, dict[str, Any]]:
        out = {}
        for r in sorted(plan.sources):
            node, local = self.source(r, plan)
            out[str(r)] = {"node": self.label(node), "local": local}
        return out

    def as_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "job_id": self.job_id,
            "world_size": self.world_size,
            "strategy": self.strategy,
            "checked": self.checked,
            "nodes": [n.as_dict() for n in self.nodes],
            "room": {n.label: node_room(n.job_dir) for n in self.nodes if n.job_dir},
            "last_saves": {
                n.label: {str(r): doc for r, doc in last_saves(n.job_dir).items()}
                for n in self.nodes
                if n.job_dir
            },
            "rank_node": {str(r): self.label(n) for r, n in sorted(self.rank_node.items())},
            "addresses": {str(r): a for r, a in sorted(self.addresses.items())},
            "steps": [
                {
                    "step": v.step,
                    "committed": v.summary.committed,
                    "finite": None if v.summary.manifest is None else v.summary.manifest.finite,
                    "non_finite": None
                    if v.summary.manifest is None
                    else v.summary.manifest.non_finite_summary() or None,
                    "manifest_error": v.summary.manifest_error,
                    "recoverable": v.recoverable,
                    "why_not": v.why_not or None,
                    "durability": v.durability,
                    "sources": self._sources(v.plan) if v.recoverable else {},
                    "damage": [{"path": str(p), **c.as_dict()} for p, c in v.summary.damage],
                    "ranks": [
                        {
                            "rank": r.rank,
                            "node": self.label(self.rank_node.get(r.rank)),
                            "state": r.state,
                            "copies": r.good,
                            "expected": r.expected,
                            "held_on": [self.label(c.node) for c in r.copies if c.condition.ok],
                            "on": [
                                {
                                    "node": self.label(c.node),
                                    **c.condition.as_dict(),
                                    "path": c.path,
                                }
                                for c in r.copies
                            ],
                        }
                        for r in v.ranks
                    ],
                }
                for v in reversed(self.steps)
            ],
            "at_risk": [{"step": s, "rank": r} for s, r in self.at(AT_RISK)],
            "lost": [{"step": s, "rank": r} for s, r in self.at(LOST)],
            "recovery": {
                "step": plan.step,
                "sources": self._sources(plan),
                "fetches": [
                    {
                        "rank": r,
                        "from_node": self.label(self.source(r)[0]),
                        "from_rank": h if h < self.world_size else None,
                    }
                    for r, h in sorted(plan.sources.items())
                    if not self.source(r)[1]
                ],
                "skipped": {str(k): v for k, v in sorted(plan.skipped.items())},
            },
            "exit": self.exit_code,
        }


# -- the last save of each rank -----------------------------------------------------------------
def last_saves(job_dir: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
    """Each rank's last-save record on this node (``memckpt.storage.last_save``), with its
    replication rate (``replication_bytes_per_s``, None when it pushed nothing)."""
    out = read_last_saves(job_dir)
    for doc in out.values():
        b, secs = doc["replication_bytes"], doc["replication_s"]
        doc["replication_bytes_per_s"] = b / secs if b and secs > 0 else None
    return out


# -- room for the next save --------------------------------------------------------------------


def node_room(job_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The engine's admission check for this node's next save (``memckpt.storage.room``).

    The next save is taken to be as large as the newest step this tree holds (its own
    objects and the replicas it keeps), less the free pool buffers it would reuse; the
    memory cgroup is this process's (run ``memckpt status`` inside the job's container).
    """
    root = Path(job_dir)
    steps = sorted((s, e.path) for e in real_subdirs(root)
                   if (s := ids.parse_step_dir(e.name)) is not None)  # fmt: skip
    newest = 0
    if steps:
        newest = sum(
            f.stat(follow_symlinks=False).st_size
            for f in os.scandir(steps[-1][1])
            if ids.parse_object_name(f.name) is not None and f.is_file(follow_symlinks=False)
        )
    pool = root / ids.POOL_DIR
    free = sum(
        f.stat(follow_symlinks=False).st_size
        for f in (os.scandir(pool) if is_real_dir(pool) else ())
        if f.name.endswith(".buf") and f.is_file(follow_symlinks=False)
    )
    need = max(0, newest - free)
    cg = cgroup_memory()
    room = Room(need, free_bytes(root) if root.exists() else 0, str(root), cg)
    why = shortfall(room) if newest else None
    return {
        "next_save_bytes": newest,
        "reusable_bytes": free,
        "need_bytes": need,
        "tmpfs_free_bytes": room.tmpfs_free,
        "cgroup": None if cg is None else {"limit": cg.limit, "usage": cg.usage,
                                           "headroom": cg.headroom, "file": cg.where},
        "fits": why is None,
        "why_not": why,
    }  # fmt: skip


# -- reading the directories -------------------------------------------------------------------


def _peer_docs(job_dir: Path) -> list[dict[str, Any]]:
    """The peer files of one tree, checked field by field (the tree is untrusted)."""
    out = []
    peers_dir = ids.JobLayout(job_dir.parent, job_dir.name).peers_dir
    for p in sorted(peers_dir.glob("rank-*.json")):
        try:
            raw = read_regular(p, 1 << 20, "peer file")  # never a FIFO, link or device
            if raw is None:
                continue
            doc = json.loads(raw)
            out.append({
                "rank": int(doc["rank"]),
                "world_size": int(doc.get("world_size") or 0),
                "node_id": str(doc.get("node_id", "")),
                "node_ids": [str(n) for n in doc.get("node_ids", [])],
                "holders": {int(k): [int(h) for h in v] for k, v in doc.get("holders", {}).items()},
                "strategy": str(doc["strategy"]) if doc.get("strategy") else None,
                "address": str(doc.get("address", "")),
            })  # fmt: skip
        except (
            OSError,
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            CorruptCheckpointError,
        ) as e:
            log.warning("ignoring unreadable %s: %s", p, e)
    return out


def _dir_label(path: str, job_id: str) -> str:
    p = Path(os.path.abspath(path))
    if p.name == job_id and p.parent.name:
        return p.parent.name
    return p.name or str(p)


def _choose_job(paths: Sequence[str], job_id: str | None) -> tuple[str, list[list[Path] | None]]:
    found: list[list[Path] | None] = []
    for p in paths:
        found.append(find_jobs(p) if os.path.lexists(p) else None)
    if job_id is not None:
        return ids.validate_job_id(job_id), found
    names = sorted({j.name for jobs in found if jobs for j in jobs})
    if len(names) == 1:
        return names[0], found
    if not names:
        raise CommandError(
            f"no memckpt job under {', '.join(paths)}: a job directory holds step-N/ "
            "directories; give each node's memory base directory, or name the job with --job"
        )
    raise CommandError(
        f"the directories hold several jobs ({', '.join(names)}); name one with --job"
    )


def _inventory(steps: list[StepSummary]) -> dict[int, StepHoldings]:
    """A node's inventory as the ranks would report it, from copies that passed our checks."""
    inv: dict[int, StepHoldings] = {}
    for s in steps:
        objects = {o.rank: o.digest for o in s.objects if o.error is None and o.digest is not None}
        m = ManifestInfo.of(s.manifest) if s.manifest is not None else None
        if objects or m is not None:
            marks = frozenset(k.checksum for k in s.marks if k.checksum is not None)
            inv[s.step] = StepHoldings(objects, m, marks)
    return inv


def _merge(step: int, per_node: list[StepSummary]) -> StepSummary:
    """One step over all nodes, by the same rule as ``scan_job`` (newest valid manifest)."""
    manifests = [s.manifest for s in per_node if s.manifest is not None]
    m = max(manifests, key=lambda x: x.created_unix) if manifests else None
    bad = next((s for s in per_node if s.manifest_error), None) if m is None else None
    recs = [s.persisted for s in per_node if s.persisted is not None and m is not None]
    rec = next((r for r in recs if m is not None and r.manifest_checksum == m.checksum), None)
    return StepSummary(
        step,
        m is not None,
        tuple(o for s in per_node for o in s.objects),
        tuple(sorted({r for s in per_node for r in s.writing_ranks})),
        m,
        bad.manifest_error if bad else None,
        tuple(k for s in per_node for k in s.marks),
        bad.manifest_path if bad else None,
        rec,
    )


@dataclass
class _Nodes:
    """The nodes as read: their views, trees (scans) and peer files."""

    views: list[NodeView]
    scans: list[list[StepSummary]]
    docs: list[dict[str, Any]]
    _held: dict[tuple[int, int], dict[int, list[ObjectSummary]]] | None = None

    def add_unlisted(self, label: str) -> int:
        self.views.append(NodeView(label, None, None, NOT_GIVEN))
        self.scans.append([])  # holds nothing: the index of holdings stays valid
        return len(self.views) - 1

    def holding(self, step: int, rank: int) -> dict[int, list[ObjectSummary]]:
        """Node index -> its copies of ``rank``'s object of ``step``."""
        if self._held is None:
            self._held = {}
            for i, sc in enumerate(self.scans):
                for s in sc:
                    for o in s.objects:
                        self._held.setdefault((s.step, o.rank), {}).setdefault(i, []).append(o)
        return self._held.get((step, rank), {})


def _read_nodes(paths: Sequence[str], job_id: str | None, verify: bool) -> tuple[str, _Nodes]:
    job, found = _choose_job(paths, job_id)
    nodes = _Nodes([], [], [])
    for p, jobs in zip(paths, found):
        jd = next((j for j in jobs or [] if j.name == job), None)
        here = _peer_docs(jd) if jd is not None else []
        nodes.docs += here
        label = here[0]["node_id"] if here and here[0]["node_id"] else _dir_label(p, job)
        if any(n.label == label for n in nodes.views):
            label = f"{label}#{len(nodes.views)}"
        state = NO_DIR if jobs is None else (HOLDS_JOB if jd is not None else EMPTY)
        nodes.views.append(NodeView(label, p, str(jd) if jd else None, state))
        nodes.scans.append(scan_job(jd, verify=verify) if jd is not None else [])
    return job, nodes


def _world_size(nodes: _Nodes) -> int:
    ws = max((d["world_size"] for d in nodes.docs), default=0)
    if not ws:
        sizes = [s.manifest.world_size for sc in nodes.scans for s in sc if s.manifest]
        ranks = [o.rank for sc in nodes.scans for s in sc for o in s.objects]
        ws = max(sizes, default=0) or (1 + max(ranks, default=-1))
    return ws


def _rank_nodes(nodes: _Nodes, world_size: int) -> dict[int, int | None]:
    """Rank -> node index: the peer files' node ids, else the one node holding its objects.

    A node the peer files name and no path gave is added (``not given``: it holds nothing).
    """
    home: dict[int, str] = {}
    for d in nodes.docs:
        home.update({r: n for r, n in enumerate(d["node_ids"]) if r not in home})
    for d in nodes.docs:  # a rank's own record wins
        home[d["rank"]] = d["node_id"] or home.get(d["rank"], "")
    index = {n.label: i for i, n in enumerate(nodes.views)}
    out: dict[int, int | None] = {}
    for r in range(world_size):
        label = home.get(r)
        if label:
            if label not in index:
                index[label] = nodes.add_unlisted(label)
            out[r] = index[label]
        else:
            on = {
                i for i, sc in enumerate(nodes.scans) for s in sc for o in s.objects if o.rank == r
            }
            out[r] = on.pop() if len(on) == 1 else None
    nodes.views = [
        NodeView(n.label, n.path, n.job_dir, n.state, tuple(r for r, i in out.items() if i == k))
        for k, n in enumerate(nodes.views)
    ]
    return out


def _rank_view(
    nodes: _Nodes,
    merged: StepSummary,
    rank: int,
    expected: set[int],
    keeps_copies: bool,
    planned: bool,
) -> RankView:
    """``expected``: nodes the replication plan keeps a copy on (``planned``: one is recorded)."""
    copies = []
    held = nodes.holding(merged.step, rank)
    for i in range(len(nodes.views)):
        copies += [CopyView(i, merged.object_condition(o), str(o.path)) for o in held.get(i, [])]
        if i not in held and i in expected:
            copies.append(CopyView(i, Condition(MISSING)))
    good = sum(c.condition.ok for c in copies)
    state = LOST if good == 0 else AT_RISK if good == 1 and keeps_copies else "ok"
    return RankView(rank, tuple(copies), len(expected) if planned else None, state)


def job_status(
    paths: Sequence[str], job_id: str | None = None, *, verify: bool = False
) -> JobStatus:
    """Status of one job whose node directories are ``paths`` (one path per node).

    ``verify`` re-hashes every object's data too (reads everything); otherwise headers,
    indexes and non-tensor parts are checked. Raises CommandError when the paths hold no
    job, or several and ``job_id`` names none.
    """
    if not paths:
        raise CommandError("give at least one node directory")
    job, nodes = _read_nodes(paths, job_id, verify)
    world_size = _world_size(nodes)
    rank_node = _rank_nodes(nodes, world_size)
    strategy = next((d["strategy"] for d in nodes.docs if d["strategy"]), None)
    holders = next((d["holders"] for d in nodes.docs if d["holders"]), {})
    expected = {
        r: {rank_node[x] for x in [r, *holders.get(r, [])] if rank_node.get(x) is not None}
        for r in range(world_size)
    }

    # the plan: one inventory per rank (its node's tree), then the nodes that run no rank
    inventories = [_inventory(sc) for sc in nodes.scans]
    holder_node: list[int | None] = [rank_node[r] for r in range(world_size)]
    holder_node += [i for i, n in enumerate(nodes.views) if not n.ranks and n.state == HOLDS_JOB]
    invs = [inventories[i] if i is not None else {} for i in holder_node]
    ws = max(world_size, 1)
    policy = resolve_on_non_finite(None)  # what a restart here would do (the environment's)
    plan = plan_recovery(invs, ws, allow_fetch=True, on_world_size_mismatch="skip",
                         on_non_finite=policy)  # fmt: skip

    by_step: dict[int, list[StepSummary]] = {}
    for sc in nodes.scans:
        for s in sc:
            by_step.setdefault(s.step, []).append(s)
    # a job keeps copies when its peer files say so, or when some object is on two nodes
    keeps_copies = strategy is not None or any(
        len(nodes.holding(st, r)) > 1 for st in by_step for r in range(world_size)
    )
    steps = []
    for st in sorted(by_step):
        merged = _merge(st, by_step[st])
        ranks = tuple(
            _rank_view(nodes, merged, r, expected.get(r, set()), keeps_copies, bool(strategy))
            for r in range(merged.world_size or world_size)
        )
        only = plan_recovery(invs, ws, allow_fetch=True, step=st, on_world_size_mismatch="skip",
                             on_non_finite="load" if policy == "load" else "raise")  # fmt: skip
        if only.non_finite is not None:  # a restart passes over it (or refuses it)
            only = RecoveryPlan(None, skipped={st: f"{NON_FINITE_REASON} ({only.non_finite[1]})"})
        steps.append(StepView(merged, ranks, only))
    addresses = {d["rank"]: d["address"] for d in nodes.docs}
    return JobStatus(job, nodes.views, world_size, strategy, rank_node, holder_node, steps,
                     plan, "data" if verify else "headers", addresses)  # fmt: skip
