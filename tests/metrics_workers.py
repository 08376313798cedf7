"""Rank functions of the metrics tests: simulated nodes, each its own directory and exporter."""

from __future__ import annotations

import os
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from memckpt.settings import METRICS_PORT_ENV
from replication_workers import manager, state


def save_load_and_scrape(rank: int, world: int, base: str, steps: list[int]) -> dict[str, Any]:
    """Save ``steps`` with pairwise replication, load the newest, scrape this node's endpoint.

    Node = rank (one rank per node); ``MEMCKPT_METRICS_PORT`` is the node's port.
    """
    port = int(os.environ[METRICS_PORT_ENV])
    with manager(rank, base, 1, "pairwise", keep_last=2) as m:
        results = [asdict(m.save(s, state(rank, s)).wait()) for s in steps]
        dest = state(rank, 0)
        m.load(state_dict=dest)
        loaded = asdict(m.last_load) if m.last_load is not None else None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            scraped = resp.read().decode()
            content_type = resp.headers.get("Content-Type", "")
        dist.barrier()  # every node scraped before any exporter stops
    textfile = Path(base) / f"node{rank}.prom"
    return {
        "results": results,
        "loaded": loaded,
        "scraped": scraped,
        "content_type": content_type,
        "textfile": textfile.read_text() if textfile.exists() else None,
        "nbytes": int(sum(t.numel() * t.element_size() for t in _tensors(state(rank, 0)))),
    }


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    return []
