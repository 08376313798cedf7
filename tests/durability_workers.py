"""Rank functions for the durability tests: two simulated nodes, replicated and drained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from replication_workers import manager, state


def save_replicated_and_drained(
    rank: int, world: int, base: str, persist: str, steps: list[int]
) -> dict[int, Any]:
    """Save ``steps`` with pairwise replication, draining every 2nd step to ``persist``;
    report what each handle said at commit and once its drain ended."""
    out: dict[int, Any] = {}
    m = manager(rank, base, 1, "pairwise", persist_every=2, persist_dir=Path(persist),
                prefault=False)  # fmt: skip
    try:
        handles = []
        for s in steps:
            h = m.save(s, state(rank, s))
            r = h.wait()
            handles.append(h)
            out[s] = {"result": (r.durability, r.copies)}
        for h in handles:
            out[h.step]["replicated"] = h.wait_for("replicated", timeout=1)
            out[h.step]["persisted"] = h.wait_for("persisted", timeout=30)
            out[h.step]["now"] = (h.durability, h.copies, h.persisted_to)
    finally:
        m.close(release_memory=False)
    return out
