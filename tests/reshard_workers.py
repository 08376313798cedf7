"""Rank bodies for resharding after a node loss (run on gloo ranks by multiproc.run_ranks).

Every rank's node is ``MEMCKPT_NODE_ID``; its memory tier is ``<base>/<node id>``.
"""

from __future__ import annotations

import os
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
    import logging

    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logging.getLogger("memckpt").addHandler(Keep())
    logging.getLogger("memckpt").setLevel(logging.INFO)

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
    skipped = [m for m in lines if "re-replication" in m and "skipped" in m]
    if rank != 0:  # the full state (cpu_offload) is gathered on rank 0 only
        return {"files": files, "skipped": skipped}
    want = torch.load(reference, weights_only=False)
    bad = [k for k, v in want["model"].items() if not torch.equal(got["model"][k], v)]
    for pid, st in want["optim"]["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and not torch.equal(got["optim"]["state"][pid][k], v):
                bad.append(f"optim {pid} {k}")
    return {"files": files, "mismatched": bad, "skipped": skipped}


def flip_first_tensor_byte(path: Path) -> None:
    """Damage one byte of an object's first tensor (its checksum no longer matches)."""
    from memckpt.storage.reader import ObjectReader

    with ObjectReader(path) as r:
        offset = r.index.tensors[0].offset
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def _state(rank: int, step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(rank * 100 + step)
    return {f"w{rank}": torch.randn(256, generator=g), "step": step}


def save_steps(rank: int, world_size: int, base: str, steps: list[int]) -> bool:
    for step in steps:
        dcp.save(_state(rank, step), checkpoint_id=checkpoint_id(_node_base(base), "job", step),
                 storage_writer=MemoryStorageWriter(replication="pairwise"))  # fmt: skip
    close()
    return True


def load_damaged_newest(rank: int, world_size: int, base: str) -> dict[str, Any]:
    """The newest step is damaged in every copy: the load fails once, then latest moves on."""
    from torch.distributed.checkpoint.api import CheckpointException

    node_base = _node_base(base)
    first = latest_checkpoint(node_base, "job")
    failed = ""
    try:
        dcp.load(_state(rank, 0), checkpoint_id=first, storage_reader=MemoryStorageReader())
    except CheckpointException as e:
        failed = str(e)
    second = latest_checkpoint(node_base, "job")
    dest = _state(rank, 0)
    dcp.load(dest, checkpoint_id=second, storage_reader=MemoryStorageReader())
    close()
    ok = torch.equal(dest[f"w{rank}"], _state(rank, 20)[f"w{rank}"]) and dest["step"] == 20
    return {"first": Path(first or "").name, "failed": failed, "second": Path(second or "").name,
            "ok": ok}  # fmt: skip


def load_step(rank: int, world_size: int, base: str, step: int) -> dict[str, Any]:
    """A restart: latest, then an explicit load of ``step`` (on a replaced node too)."""
    node_base = _node_base(base)
    latest = latest_checkpoint(node_base, "job")
    dest = _state(rank, 0)
    dcp.load(dest, checkpoint_id=checkpoint_id(node_base, "job", step),
             storage_reader=MemoryStorageReader())  # fmt: skip
    ok = torch.equal(dest[f"w{rank}"], _state(rank, step)[f"w{rank}"]) and dest["step"] == step
    # training goes on: the writer names the replication the restart lines did not
    dcp.save(_state(rank, step + 1), checkpoint_id=checkpoint_id(node_base, "job", step + 1),
             storage_writer=MemoryStorageWriter(replication="pairwise"))  # fmt: skip
    close()
    return {"latest": Path(latest or "").name, "ok": ok}


class _NoMetadataPlanner(dcp.DefaultSavePlanner):
    """A custom planner that keeps no ``metadata`` attribute (DCP allows that)."""

    def create_global_plan(self, all_plans):  # type: ignore[no-untyped-def]
        plans, md = super().create_global_plan(all_plans)
        del self.metadata
        return plans, md


def save_with_custom_planner(rank: int, world_size: int, base: str) -> bool:
    dcp.save(_state(rank, 7), checkpoint_id=checkpoint_id(_node_base(base), "job", 7),
             storage_writer=MemoryStorageWriter(replication="pairwise"),
             planner=_NoMetadataPlanner())  # fmt: skip
    close()
    return True


def load_newest_loadable(rank: int, world_size: int, base: str) -> dict[str, Any]:
    """``load_newest``: one call passes over a step damaged in every copy."""
    from memckpt.adapters.dcp import load_newest

    node_base = _node_base(base)
    dest = _state(rank, 0)

    def load(cid: str) -> int:
        dcp.load(dest, checkpoint_id=cid, storage_reader=MemoryStorageReader())
        return int(dest["step"])

    out = load_newest(load, node_base, "job")
    close()
    assert out is not None
    ok = torch.equal(dest[f"w{rank}"], _state(rank, out[1])[f"w{rank}"])
    return {"cid": Path(out[0]).name, "step": out[1], "ok": ok}
