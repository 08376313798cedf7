"""Rank functions for the 2-rank re-seed test: simulated nodes with a durable tier on disk."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from replication_workers import manager, state


def _check(rank: int, dest: dict[str, Any], step: int) -> None:
    want = state(rank, step)
    for k in ("w", "b"):
        assert torch.equal(dest["model"][k], want["model"][k]), k
    assert torch.equal(dest["opt"]["exp_avg"], want["opt"]["exp_avg"])
    assert dest["opt"]["step"] == step and dest["rank"] == rank


def save_and_drain(rank: int, world: int, base: str, durable: str, steps: list[int]) -> None:
    with manager(rank, base, 1, "pairwise", persist_every=1, persist_dir=durable) as m:
        for s in steps:
            assert m.save(s, state(rank, s)).wait().committed


def restore(rank: int, world: int, base: str, durable: str, keep: bool) -> dict[str, Any]:
    """Load the newest step by the tier rule; with ``keep`` end as a crash would (memory kept)."""
    m = manager(rank, base, 1, "pairwise", persist_dir=durable)
    try:
        dest = state(rank, 0)
        m.load(state_dict=dest)
        info = m.last_load
        assert info is not None
        _check(rank, dest, info.step)
        m.wait()  # the re-seed commits (and replicates) in the background
        dist.barrier()
        held = sorted(o.rank for o in m.store.objects(info.step))
        return {"tier": info.tier, "step": info.step, "fetched": info.fetched_bytes,
                "committed": m.store.committed_steps(), "held": held}  # fmt: skip
    finally:
        m.close(release_memory=False if keep else None)
