"""Functions run on every rank by the multi-process tests (importable by spawned children)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import memckpt
from zoo import LOAD_NON_FINITE, assert_same, make_zoo


def node_dir(base: str, rank: int, ranks_per_node: int) -> Path:
    return Path(base) / f"node{rank // ranks_per_node}"


def zoo_round_trip(rank: int, world: int, base: str, ranks_per_node: int) -> dict:
    os.environ.update(LOAD_NON_FINITE)  # the zoo holds NaN on purpose
    d = node_dir(base, rank, ranks_per_node)
    with memckpt.CheckpointManager(d, "job", keep_last=2, timeout_s=30) as m:
        for step in (1, 2, 3):
            m.save(step, {"zoo": make_zoo(seed=rank * 10 + step), "rank": rank}).wait()
        latest = m.latest()
        out = m.load()
        assert_same(out, {"zoo": make_zoo(seed=rank * 10 + 3), "rank": rank})
        dest = {"zoo": make_zoo(seed=999), "rank": -1}
        dest["zoo"]["expanded"] = torch.zeros(3, 4)
        m.load(step=2, state_dict=dest)
        assert dest["rank"] == rank
        assert torch.equal(dest["zoo"]["big"], make_zoo(seed=rank * 10 + 2)["big"])
        return {"latest": latest, "steps": sorted(p.name for p in d.glob("job/step-*"))}


def one_rank_runs_out_of_space(rank: int, world: int, base: str) -> dict:
    limit = (8 << 20) if rank == 1 else None
    with memckpt.CheckpointManager(base, "job", keep_last=1, limit_bytes=limit, timeout_s=30) as m:
        m.save(1, {"t": torch.ones(1 << 20)}).wait()
        h = m.save(2, {"t": torch.ones(4 << 20)})  # 16 MiB, over rank 1's limit
        try:
            r = h.wait()
            err, skipped = None, r.skipped
        except memckpt.MemckptError as e:
            err, skipped = f"{type(e).__name__}: {e}", None
        latest = m.latest()
        ok = torch.equal(m.load()["t"], torch.ones(1 << 20))
        return {"error": err, "skipped": skipped, "latest": latest, "loaded_previous": ok}


def save_then_die(rank: int, world: int, base: str) -> dict:
    """Rank 1 is killed (fault point) while saving step 2; rank 0 must not hang."""
    with memckpt.CheckpointManager(base, "job", keep_last=1, timeout_s=5) as m:
        m.save(1, {"t": torch.full((1000,), 1.0), "r": rank}).wait()
        t0 = time.monotonic()
        h = m.save(2, {"t": torch.full((1000,), 2.0), "r": rank})
        try:
            h.wait(timeout=60)
            err = None
        except memckpt.MemckptError as e:
            err = f"{type(e).__name__}: {e}"
        return {"error": err, "waited": time.monotonic() - t0}


def recover_after_death(rank: int, world: int, base: str) -> dict:
    with memckpt.CheckpointManager(base, "job", keep_last=1, timeout_s=30) as m:
        latest = m.latest()
        sd = m.load()
        dist.barrier()
        return {"latest": latest, "t0": sd["t"][0].item(), "r": sd["r"]}
