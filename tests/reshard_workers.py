"""Rank bodies for resharding after a node loss (run on gloo ranks by multiproc.run_ranks).

Every rank's node is ``MEMCKPT_NODE_ID``; its memory tier is ``<base>/<node id>``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from dcp_workers import _fsdp_model, _full_state, _train_step
from memckpt.adapters.dcp import (
    MemoryStorageReader,
    MemoryStorageWriter,
    checkpoint_id,
    close,
    latest_checkpoint,
)


def _node_base(base: str) -> Path:
    return Path(base) / os.environ["MEMCKPT_NODE_ID"]


def save_fsdp(rank: int, world_size: int, base: str, reference: str) -> bool:
    """FSDP2 + AdamW, 3 steps, saved as step 3 with pairwise replication."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _fsdp_model(world_size)
    for s in range(3):
        _train_step(model, opt, s)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=checkpoint_id(_node_base(base), "job", 3),
             storage_writer=MemoryStorageWriter(replication="pairwise"))  # fmt: skip
    full = _full_state(model, opt)
    close()
    if rank == 0:
        torch.save(full, reference)
    return True


def load_fsdp(
    rank: int, world_size: int, base: str, reference: str, replication: str | None
) -> dict[str, Any]:
    """The docs' restart lines (``replication`` None: exactly the first example)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = _fsdp_model(world_size)
    _train_step(model, opt, 99)  # another state: the load must overwrite it
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    node_base = _node_base(base)
    if replication is None:
        latest = latest_checkpoint(node_base, "job")
        reader = MemoryStorageReader()
    else:
        latest = latest_checkpoint(node_base, "job", replication=replication)
        reader = MemoryStorageReader(replication=replication)
    assert latest == checkpoint_id(node_base, "job", 3), latest
    dcp.load(state, checkpoint_id=latest, storage_reader=reader)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    got = _full_state(model, opt)
    close()  # waits for re-replication in the background
    files = sorted(p.name for p in (node_base / "job" / "step-3").glob("rank-*.mck"))
    if rank != 0:  # the full state (cpu_offload) is gathered on rank 0 only
        return {"files": files}
    want = torch.load(reference, weights_only=False)
    bad = [k for k, v in want["model"].items() if not torch.equal(got["model"][k], v)]
    for pid, st in want["optim"]["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and not torch.equal(got["optim"]["state"][pid][k], v):
                bad.append(f"optim {pid} {k}")
    return {"files": files, "mismatched": bad, "time": time.time()}
