"""Rank functions for the node-loss tests: simulated nodes, each its own directory and servers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import memckpt


def node_of(rank: int, ranks_per_node: int) -> int:
    return rank // ranks_per_node


def state(rank: int, step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {
        "model": {"w": torch.randn(256, 64, generator=g), "b": torch.randn(64, generator=g)},
        "opt": {"step": step, "exp_avg": torch.randn(256, 64, generator=g).bfloat16()},
        "rank": rank,
    }


def manager(rank: int, base: str, rpn: int, strategy: str | None, **kw: Any) -> Any:
    node = node_of(rank, rpn)
    return memckpt.CheckpointManager(
        Path(base) / f"node{node}",
        "job",
        keep_last=kw.pop("keep_last", 2),
        timeout_s=kw.pop("timeout_s", 30),
        replication=strategy,
        node_id=f"node{node}",
        transfer_host="127.0.0.1",
        transfer_timeout_s=5,
        **kw,
    )


def save_steps(rank: int, world: int, base: str, rpn: int, strategy: str, steps: list[int]) -> dict:
    out = {}
    with manager(rank, base, rpn, strategy) as m:
        for s in steps:
            r = m.save(s, state(rank, s)).wait()
            out[s] = (r.replicated, r.replication_bytes)
        holders = m.replicator.holders() if m.replicator else ()
    return {"results": out, "holders": holders}


def recover(rank: int, world: int, base: str, rpn: int, strategy: str) -> dict:
    with manager(rank, base, rpn, strategy) as m:
        t0 = time.monotonic()
        latest = m.latest()
        plan = m.recovery_plan()
        dest = state(rank, 0)
        loaded = m.load(state_dict=dest)
        elapsed = time.monotonic() - t0
        if loaded is not None:
            want = state(rank, latest)
            for k in ("w", "b"):
                assert torch.equal(dest["model"][k], want["model"][k]), k
            assert torch.equal(dest["opt"]["exp_avg"], want["opt"]["exp_avg"])
            assert dest["opt"]["step"] == latest and dest["rank"] == rank
        m.wait()  # re-replication runs in the background after load
        dist.barrier()
        info = m.last_load
        return {
            "latest": latest,
            "fetches": plan.fetches,
            "source": info.source_rank if info else None,
            "fetched_bytes": info.fetched_bytes if info else 0,
            "elapsed": elapsed,
            "loaded": loaded is not None,
        }


def replication_fails_midway(rank: int, world: int, base: str) -> dict:
    """Rank 1's server stops before step 2: step 2 commits unreplicated; step 1 is kept."""
    with manager(rank, base, 1, "pairwise", keep_last=1) as m:
        r1 = m.save(1, state(rank, 1)).wait()
        dist.barrier()
        if rank == 1:
            m.replicator.server.close()
        dist.barrier()
        r2 = m.save(2, state(rank, 2)).wait()
        steps = sorted(p.name for p in (Path(base) / f"node{rank}" / "job").glob("step-*"))
        return {"r1": r1.replicated, "r2": r2.replicated, "steps": steps}


def die_mid_transfer(rank: int, world: int, base: str) -> dict:
    """A fault point kills one rank in the middle of sending or receiving step 2's replica."""
    with manager(rank, base, 1, "pairwise", timeout_s=5) as m:
        m.save(1, state(rank, 1)).wait()
        try:
            m.save(2, state(rank, 2)).wait()
            err = None
        except memckpt.MemckptError as e:
            err = type(e).__name__
        return {"error": err}
