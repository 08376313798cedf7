"""Where a job's data lives across nodes, and what a restart would do (``memckpt status``).

Reads node directories offline: each path is one node's base directory (or its job
directory). The ranks of a replicated job record their node, address and the
replication plan in ``<job>/.peers/rank-<r>.json``; with those the report says, for
each step and rank, which nodes hold a valid copy, which should, and which step a
restart would load with which fetches (the same pure ``plan_recovery`` the ranks run).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memckpt import ids
from memckpt.engine.recovery_plan import RecoveryPlan, plan_recovery
from memckpt.errors import CorruptCheckpointError, MemckptError
from memckpt.storage.inventory import StepHoldings
from memckpt.storage.safe_fs import read_regular
from memckpt.storage.store import node_inventory
from memckpt.tools.catalog import find_jobs

__all__ = ["JobStatus", "job_status"]

log = logging.getLogger(__name__)


@dataclass
class JobStatus:
    job_id: str
    nodes: list[str]  # node labels, one per path
    node_dirs: list[str]
    world_size: int | None
    strategy: str | None
    rank_node: dict[int, int]  # rank -> index into nodes, where known
    expected: dict[int, list[int]]  # rank -> node indexes that should hold a copy (incl. own)
    held: dict[int, dict[int, list[int]]]  # step -> rank -> node indexes holding a valid copy
    plan: RecoveryPlan
    addresses: dict[int, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "nodes": [{"node": n, "dir": d} for n, d in zip(self.nodes, self.node_dirs)],
            "world_size": self.world_size,
            "strategy": self.strategy,
            "rank_node": {str(r): self.nodes[n] for r, n in self.rank_node.items()},
            "addresses": {str(r): a for r, a in self.addresses.items()},
            "steps": {
                str(s): {
                    str(r): {
                        "held_on": [self.nodes[n] for n in nodes],
                        "expected_on": [self.nodes[n] for n in self.expected.get(r, [])],
                    }
                    for r, nodes in sorted(by_rank.items())
                }
                for s, by_rank in sorted(self.held.items())
            },
            "recovery": {
                "step": self.plan.step,
                "fetches": [{"rank": r, "from_rank": s} for r, s in self.plan.fetches],
                "skipped": {str(k): v for k, v in self.plan.skipped.items()},
            },
        }


def _read_peers(job_dir: Path) -> list[dict[str, Any]]:
    out = []
    peers_dir = ids.JobLayout(job_dir.parent, job_dir.name).peers_dir
    for p in sorted(peers_dir.glob("rank-*.json")):
        try:
            raw = read_regular(p, 1 << 20, "peer file")  # never a FIFO, link or device
            if raw is not None:
                out.append(json.loads(raw))
        except (OSError, ValueError, CorruptCheckpointError) as e:
            log.warning("ignoring unreadable %s: %s", p, e)
    return out


def _job_dir(path: str | os.PathLike[str], job_id: str | None) -> Path:
    jobs = find_jobs(path)
    if job_id is not None:
        jobs = [j for j in jobs if j.name == job_id]
    if len(jobs) != 1:
        names = ", ".join(j.name for j in jobs) or "none"
        raise MemckptError(f"{path} holds jobs: {names}; name one with --job")
    return jobs[0]


def _own_holdings(inventories: list[dict[int, StepHoldings]], r: int) -> dict[int, StepHoldings]:
    """Rank r's own objects wherever they are, with each step's manifest."""
    out: dict[int, StepHoldings] = {}
    for inv in inventories:
        for s, holding in inv.items():
            cur = out.get(s, StepHoldings())
            objects = dict(cur.objects)
            if r in holding.objects:
                objects[r] = holding.objects[r]
            out[s] = StepHoldings(objects, cur.manifest or holding.manifest)
    return out


def job_status(paths: list[str], job_id: str | None = None) -> JobStatus:
    """Status of one job whose node directories are ``paths`` (one path per node)."""
    if not paths:
        raise MemckptError("give at least one node directory")
    job_dirs = [_job_dir(p, job_id) for p in paths]
    names = {j.name for j in job_dirs}
    if len(names) != 1:
        raise MemckptError(f"the paths hold different jobs: {sorted(names)}; pass --job")
    job = names.pop()
    nodes: list[str] = []
    rank_node: dict[int, int] = {}
    addresses: dict[int, str] = {}
    world_size: int | None = None
    strategy: str | None = None
    holders: dict[int, list[int]] = {}
    node_label_of_rank: dict[int, str] = {}
    for i, jd in enumerate(job_dirs):
        peers = _read_peers(jd)
        label = peers[0]["node_id"] if peers else jd.parent.name
        nodes.append(str(label))
        for doc in peers:
            r = int(doc["rank"])
            rank_node[r] = i
            addresses[r] = str(doc.get("address", ""))
            world_size = int(doc.get("world_size") or 0) or world_size
            strategy = doc.get("strategy") or strategy
            holders = {int(k): [int(h) for h in v] for k, v in doc.get("holders", {}).items()}
            node_label_of_rank.update(enumerate(doc.get("node_ids", [])))
    inventories = [node_inventory(ids.JobLayout(jd.parent, jd.name)) for jd in job_dirs]
    held: dict[int, dict[int, list[int]]] = {}
    for i, inv in enumerate(inventories):
        for s, holding in inv.items():
            for r in holding.objects:
                held.setdefault(s, {}).setdefault(r, []).append(i)
    if world_size is None:
        world_size = 1 + max((r for by_rank in held.values() for r in by_rank), default=-1)
    label_index = {label: i for i, label in enumerate(nodes)}
    expected: dict[int, list[int]] = {}
    for r in range(world_size):
        want = [node_label_of_rank.get(r)] + [node_label_of_rank.get(h) for h in holders.get(r, [])]
        expected[r] = sorted({label_index[w] for w in want if w in label_index})
    if rank_node:
        # a rank's inventory is its node's; ranks on nodes not given hold nothing
        per_rank = [inventories[rank_node[r]] if r in rank_node else {} for r in range(world_size)]
    else:
        # no replication record: each rank counts as holding its own data wherever it is
        per_rank = [_own_holdings(inventories, r) for r in range(world_size)]
    plan = plan_recovery(per_rank, max(world_size, 1), allow_fetch=bool(rank_node),
                         on_world_size_mismatch="skip")  # fmt: skip
    return JobStatus(job, nodes, [str(j) for j in job_dirs], world_size, strategy, rank_node,
                     expected, held, plan, addresses)  # fmt: skip
