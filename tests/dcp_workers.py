"""Rank bodies for the DCP adapter tests (run on gloo ranks by multiproc.run_ranks)."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from memckpt.adapters.dcp import (
    MemoryStorageReader,
    MemoryStorageWriter,
    checkpoint_id,
    latest_checkpoint,
)

warnings.filterwarnings("ignore", category=UserWarning)


def rank_state(rank: int, step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(rank * 100 + step)
    return {
        f"w{rank}": torch.randn(1000, generator=g),  # each rank's own key
        "shared": torch.full((4,), float(step)),  # the same on every rank: written once
        "meta": {"step": step, "tag": f"s{step}"},
    }


def round_trip(rank: int, world_size: int, base: str, replication: str | None) -> bool:
    if replication:
        os.environ["MEMCKPT_NODE_ID"] = f"node{rank}"
    node_base = Path(base) / (f"node{rank}" if replication else "")
    for step in (10, 20):
        state = rank_state(rank, step)
        dcp.save(state, checkpoint_id=checkpoint_id(node_base, "job", step),
                 storage_writer=MemoryStorageWriter(replication=replication,
                                                    keep_last=1))  # fmt: skip
    latest = latest_checkpoint(node_base, "job", replication=replication)
    assert latest == checkpoint_id(node_base, "job", 20), latest
    dest = rank_state(rank, 0)
    for t in (dest[f"w{rank}"], dest["shared"]):
        t.zero_()
    dcp.load(dest, checkpoint_id=latest, storage_reader=MemoryStorageReader(
        replication=replication))  # fmt: skip
    want = rank_state(rank, 20)
    assert torch.equal(dest[f"w{rank}"], want[f"w{rank}"])
    assert torch.equal(dest["shared"], want["shared"])
    assert dest["meta"] == want["meta"], dest["meta"]
    # retention kept only step 20 (keep_last=1) on every node
    steps = sorted(p.name for p in (node_base / "job").glob("step-*"))
    assert steps == ["step-20"], steps
    return True


def wipe_and_recover(rank: int, world_size: int, base: str) -> bool:
    """Two simulated nodes with pairwise replication; node 1 loses its memory."""
    os.environ["MEMCKPT_NODE_ID"] = f"node{rank}"
    node_base = Path(base) / f"node{rank}"
    dcp.save(rank_state(rank, 5), checkpoint_id=checkpoint_id(node_base, "job", 5),
             storage_writer=MemoryStorageWriter(replication="pairwise"))  # fmt: skip
    from memckpt.adapters.dcp import close

    close()
    dist.barrier()
    if rank == 1:
        shutil.rmtree(node_base)
    dist.barrier()
    latest = latest_checkpoint(node_base, "job", replication="pairwise")
    assert latest is not None and latest.endswith("step-5"), latest
    dest = rank_state(rank, 0)
    dcp.load(dest, checkpoint_id=latest, storage_reader=MemoryStorageReader(
        replication="pairwise"))  # fmt: skip
    want = rank_state(rank, 5)
    assert torch.equal(dest[f"w{rank}"], want[f"w{rank}"]) and dest["meta"] == want["meta"]
    # the replaced node got the manifest back
    assert (node_base / "job" / "step-5" / "manifest.json").exists()
    return True


def async_modes(rank: int, world_size: int, base: str) -> dict[str, bool]:
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    out = {}
    for i, mode in enumerate((AsyncCheckpointerType.THREAD, AsyncCheckpointerType.PROCESS)):
        step = 100 + i
        state = rank_state(rank, step)
        fut = dcp.async_save(state, checkpoint_id=checkpoint_id(base, "job", step),
                             storage_writer=MemoryStorageWriter(),
                             async_checkpointer_type=mode)  # fmt: skip
        # the caller mutates its tensors right after async_save returns
        state[f"w{rank}"].fill_(-1.0)
        fut.result(timeout=120)
        dest = rank_state(rank, 0)
        dcp.load(dest, checkpoint_id=checkpoint_id(base, "job", step),
                 storage_reader=MemoryStorageReader())  # fmt: skip
        out[mode.value] = torch.equal(dest[f"w{rank}"], rank_state(rank, step)[f"w{rank}"])
    # torch >= 2.9: an explicit stager with StagingOptions (CPU: no pinned/shared memory)
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = DefaultStager(StagingOptions(False, False, False, False))
    state = rank_state(rank, 102)
    resp = dcp.async_save(state, checkpoint_id=checkpoint_id(base, "job", 102),
                          storage_writer=MemoryStorageWriter(), async_stager=stager)  # fmt: skip
    upload = getattr(resp, "upload_completion", resp)
    staged = getattr(resp, "staging_completion", None)
    if staged is not None:
        staged.result(timeout=120)
    state[f"w{rank}"].fill_(-1.0)
    upload.result(timeout=120)
    stager.close()
    dest = rank_state(rank, 0)
    dcp.load(dest, checkpoint_id=checkpoint_id(base, "job", 102),
             storage_reader=MemoryStorageReader())  # fmt: skip
    out["stager"] = torch.equal(dest[f"w{rank}"], rank_state(rank, 102)[f"w{rank}"])
    return out


# -- FSDP2 resharding ----------------------------------------------------------------------


def _fsdp_model(world_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 36), torch.nn.ReLU(), torch.nn.Linear(36, 12))
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 24, generator=g)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))  # fmt: skip
    return {"model": msd, "optim": osd}


def fsdp_save(rank: int, world_size: int, base: str, reference: str) -> bool:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _fsdp_model(world_size)
    for s in range(3):
        _train_step(model, opt, s)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=checkpoint_id(base, "job", 3),
             storage_writer=MemoryStorageWriter())  # fmt: skip
    full = _full_state(model, opt)
    if rank == 0:
        torch.save(full, reference)
    return True


def fsdp_load(rank: int, world_size: int, base: str, reference: str) -> bool:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = _fsdp_model(world_size)
    _train_step(model, opt, 99)  # a different state, so the load must overwrite it
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    latest = latest_checkpoint(base, "job")
    assert latest is not None
    dcp.load(state, checkpoint_id=latest, storage_reader=MemoryStorageReader())
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    got = _full_state(model, opt)
    if rank != 0:  # the full state (cpu_offload) is gathered on rank 0 only
        return True
    want = torch.load(reference, weights_only=False)
    assert want["model"].keys() == got["model"].keys()
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    for pid, st in want["optim"]["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(got["optim"]["state"][pid][k], v), (pid, k)
    return True


# -- async_save staging (issue 23) ----------------------------------------------------------


def _pool_files(base: str, job: str) -> list[str]:
    return sorted(p.name for p in (Path(base) / job / ".pool").iterdir())


def _staged_inodes(base: str, job: str, rank: int, mode: str) -> set[int]:
    """Inodes of the buffers this process staged the job's saves into."""
    from memckpt.engine.runtime import NodeRuntime
    from memckpt.engine.staging import StagingArea

    if mode == "thread":
        rt = NodeRuntime.find(base, job)
        assert rt is not None
        try:
            pool = rt.store.pool
            bufs = [*pool._free, *pool._in_use.values()]
        finally:
            rt.release()
    else:
        (area,) = [a for a in StagingArea.all() if a.root == Path(base) / job]
        pool = area.pool
        bufs = [*pool._free, *pool._in_use.values(), *pool._handed.values()]
    return {os.fstat(b.fd).st_ino for b in bufs}


def staged_async_saves(rank: int, world_size: int, base: str, mode: str, saves: int) -> dict:
    """``saves`` async saves with one executor; every tensor changes right after each
    async_save returns. Returns what the tests check: values loaded back, and how the
    staged buffers travelled."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    from memckpt.adapters.dcp import close

    kind = AsyncCheckpointerType(mode)
    job = f"job-{mode}"
    out: dict[str, Any] = {"loaded": [], "futures": [], "pool_sizes": [], "in_place": []}
    for step in range(1, saves + 1):
        state = rank_state(rank, step)
        fut = dcp.async_save(state, checkpoint_id=checkpoint_id(base, job, step),
                             storage_writer=MemoryStorageWriter(keep_last=1),
                             async_checkpointer_type=kind)  # fmt: skip
        out["futures"].append(type(fut).__name__)
        for v in (state[f"w{rank}"], state["shared"]):  # the caller mutates at once
            v.fill_(-7.0)
        state["meta"]["step"] = -7
        fut.result(timeout=120)
        # the object committed is the file this process staged into (no second copy)
        obj = Path(checkpoint_id(base, job, step)) / f"rank-{rank}.mck"
        out["in_place"].append(os.stat(obj).st_ino in _staged_inodes(base, job, rank, mode))
        dest = rank_state(rank, 0)
        dcp.load(dest, checkpoint_id=checkpoint_id(base, job, step),
                 storage_reader=MemoryStorageReader())  # fmt: skip
        want = rank_state(rank, step)
        out["loaded"].append(
            torch.equal(dest[f"w{rank}"], want[f"w{rank}"])
            and torch.equal(dest["shared"], want["shared"])
            and dest["meta"] == want["meta"]
        )
        out["pool_sizes"].append(len(_pool_files(base, job)))
    if mode == "process":
        from torch.distributed.checkpoint import _async_process_executor as ape

        proc, ape._CHECKPOINT_PROCESS = ape._CHECKPOINT_PROCESS, None
        if proc is not None:
            proc.__del__()  # stop DCP's daemon (it closes its runtime) before we look
    dist.barrier()
    close()
    out["left_staged"] = [n for n in _pool_files(base, job) if n.endswith(".staged")]
    return out


def fsdp_async_save(rank: int, world_size: int, base: str, mode: str) -> bool:
    """FSDP2 (DTensor) state through async_save's staging, then training goes on at once."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    model, opt = _fsdp_model(world_size)
    _train_step(model, opt, 0)
    msd, osd = get_state_dict(model, opt)
    want = {k: v.to_local().clone() for k, v in msd.items()}
    # DCP's background save runs collectives while training runs FSDP's: a group of its own
    pg = dist.new_group(backend="gloo")
    fut = dcp.async_save({"model": msd, "optim": osd},
                         checkpoint_id=checkpoint_id(base, f"fsdp-{mode}", 1),
                         storage_writer=MemoryStorageWriter(), process_group=pg,
                         async_checkpointer_type=AsyncCheckpointerType(mode))  # fmt: skip
    _train_step(model, opt, 1)  # changes every parameter
    fut.result(timeout=120)
    msd, osd = get_state_dict(model, opt)
    assert not torch.equal(next(iter(msd.values())).to_local(), next(iter(want.values())))
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=checkpoint_id(base, f"fsdp-{mode}", 1),
             storage_reader=MemoryStorageReader())  # fmt: skip
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    got, _ = get_state_dict(model, opt)
    for k, v in want.items():
        assert torch.equal(got[k].to_local(), v), k
    if mode == "process":
        from torch.distributed.checkpoint import _async_process_executor as ape

        proc, ape._CHECKPOINT_PROCESS = ape._CHECKPOINT_PROCESS, None
        if proc is not None:
            proc.__del__()
    return True
