"""Rank bodies for the Megatron-Core adapter tests (run on gloo ranks by multiproc.run_ranks)."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

with warnings.catch_warnings():  # megatron warns at import without apex / transformer-engine
    warnings.simplefilter("ignore")
    from megatron.core import dist_checkpointing as dc
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from memckpt.adapters import megatron as mm

SHAPES = {"w": (16, 6), "v": (6, 8), "e": (8, 8), "b": (5,), "ffn": (16, 4)}


def patch_megatron_cuda() -> None:
    """Let Megatron's own CUDA-only code run on this CPU machine.

    Megatron's AsyncCallsQueue calls ``torch.cuda.synchronize()`` before it forks the
    checkpoint process and puts the flag of its completion all-reduce on
    ``torch.cuda.current_device()``; its torch_dist save calls ``torch.cuda.synchronize()``
    too. On a CPU-only torch both raise. memckpt's strategies call neither
    (test_megatron_adapter checks that with both made to raise).
    """
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


def full(name: str, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step * 100 + sorted(SHAPES).index(name))
    return torch.randn(SHAPES[name], generator=g)


def _piece(name: str, step: int, axis: int, i: int, n: int, empty: bool) -> torch.Tensor:
    t = full(name, step)
    size = t.shape[axis] // n
    t = t.narrow(axis, i * size, size).clone()
    return t.zero_() if empty else t


def sharded_state(
    rank: int, world: int, step: int, layout: str, *, empty: bool = False, saved_world: int = 0
) -> dict[str, Any]:
    """A Megatron sharded state dict of this rank: several shardings, objects, common state.

    ``rows``: w and e split on axis 0 (e on a 2 x 2 grid with 4 ranks), ffn in two
    fragments per rank on axis 0, v on axis 1, b replicated (rank 0 the main replica),
    one ShardedObject per rank. ``cols``: the other axes, one ffn piece per rank, and
    rank r loads the objects r, r + world, ... of ``saved_world`` ranks.
    """

    def st(name: str, axis: int, i: int, n: int) -> ShardedTensor:
        data = _piece(name, step, axis, i, n, empty)
        return ShardedTensor.from_rank_offsets(name, data, (axis, i, n))

    sd: dict[str, Any] = {"iteration": step, "args": {"lr": 0.1, "layout": layout}}
    b = full("b", step)
    sd["b"] = ShardedTensor.from_rank_offsets("b", b.zero_() if empty else b, replica_id=rank)
    if layout == "rows":
        sd["w"] = st("w", 0, rank, world)
        if world == 4:  # a 2 x 2 grid
            data = full("e", step).view(2, 4, 2, 4)[rank // 2, :, rank % 2, :].clone()
            sd["e"] = ShardedTensor.from_rank_offsets(
                "e", data.zero_() if empty else data, (0, rank // 2, 2), (1, rank % 2, 2)
            )
        else:
            sd["e"] = st("e", 0, rank, world)
        sd["v"] = st("v", 1, rank, world)
        sd["ffn"] = [st("ffn", 0, rank, 2 * world), st("ffn", 0, rank + world, 2 * world)]
        sd["obj"] = ShardedObject("obj", {"rank": rank, "step": step}, (world,), (rank,))
    else:
        sd["w"] = st("w", 1, rank, world)
        sd["e"] = st("e", 1, rank, world)
        sd["v"] = st("v", 0, rank, world)
        sd["ffn"] = [st("ffn", 1, rank, world)]
        n = saved_world or world
        sd["obj"] = [ShardedObject("obj", None, (n,), (i,)) for i in range(rank, n, world)]
    return sd


def check_loaded(loaded: dict[str, Any], rank: int, world: int, step: int, layout: str,
                 saved_world: int = 0) -> None:  # fmt: skip
    want = sharded_state(rank, world, step, layout, saved_world=saved_world)
    assert loaded["iteration"] == step and loaded["args"]["lr"] == 0.1, loaded["args"]
    for name in ("w", "e", "v", "b"):
        assert torch.equal(loaded[name], want[name].data), (rank, name)
    for got, exp in zip(loaded["ffn"], want["ffn"], strict=True):
        assert torch.equal(got, exp.data), (rank, "ffn")
    if layout == "rows":
        assert loaded["obj"] == {"rank": rank, "step": step}, loaded["obj"]
    else:
        n = saved_world or world
        assert loaded["obj"] == [{"rank": i, "step": step} for i in range(rank, n, world)]


def _load(base: Path, rank: int, world: int, layout: str, replication: str | None,
          saved_world: int = 0) -> tuple[str, dict[str, Any]]:  # fmt: skip
    latest = mm.latest_checkpoint(base, "job", replication=replication)
    assert latest is not None
    target = sharded_state(rank, world, 0, layout, empty=True, saved_world=saved_world)
    loaded = dc.load(target, latest, mm.MemoryLoadShardedStrategy(replication=replication))
    return latest, loaded


def two_nodes(rank: int, world: int, base: str, regular: str) -> dict[str, Any]:
    """Two simulated nodes (own base dir, node id, pairwise replication) through a job's life."""
    patch_megatron_cuda()
    os.environ["MEMCKPT_NODE_ID"] = f"node{rank}"
    node = Path(base) / f"node{rank}"
    rep = "pairwise"
    out: dict[str, Any] = {}

    # Fallback: nothing in memory yet, so the job loads its regular (torch_dist) checkpoint
    os.makedirs(regular, exist_ok=True)
    dc.save(sharded_state(rank, world, 1, "rows"), regular)
    dist.barrier()
    assert mm.latest_checkpoint(node, "job", replication=rep) is None
    check_loaded(dc.load(sharded_state(rank, world, 0, "rows", empty=True), regular),
                 rank, world, 1, "rows")  # fmt: skip

    # Async saves through Megatron's AsyncCallsQueue (forked checkpoint process)
    strategy = mm.MemoryAsyncSaveStrategy(replication=rep)
    queue = AsyncCallsQueue(persistent=False)
    for step in (10, 20):
        state = sharded_state(rank, world, step, "rows")
        queue.schedule_async_request(mm.save(state, mm.checkpoint_id(node, "job", step), strategy))
        for t in (state["w"].data, state["ffn"][1].data):
            t.fill_(-1.0)  # training goes on: the checkpoint holds the staged values
        finalized: list[int] = []
        deadline = time.monotonic() + 60
        while not finalized and time.monotonic() < deadline:
            finalized = queue.maybe_finalize_async_calls(blocking=False)
            time.sleep(0.01)
        assert finalized, f"step {step} not finalized"
        step_dir = node / "job" / f"step-{step}"
        out[f"files_{step}"] = sorted(p.name for p in step_dir.iterdir())
    queue.close()

    # A sync save through Megatron's own entry point: rank 0 writes common.pt, the
    # strategy carries it (and metadata.json) to the other node
    cid = mm.checkpoint_id(node, "job", 30)
    os.makedirs(cid, exist_ok=True)
    dc.save(sharded_state(rank, world, 30, "rows"), cid, sharded_strategy=strategy)
    out["files_30"] = sorted(p.name for p in Path(cid).iterdir())

    latest, loaded = _load(node, rank, world, "rows", rep)
    assert latest == cid, latest
    check_loaded(loaded, rank, world, 30, "rows")
    _, loaded = _load(node, rank, world, "cols", rep)  # another layout, same world
    check_loaded(loaded, rank, world, 30, "cols")
    out["steps"] = sorted(p.name for p in (node / "job").glob("step-*"))

    # A save that fails on one rank fails on every rank, in Megatron's finalize, and
    # leaves the previous step the newest complete one
    from memckpt.engine import save_transaction as transaction

    real_finalize = transaction.SaveTransaction.finalize

    def failing_finalize(txn: Any, *args: Any, **kwargs: Any) -> Any:
        if rank == 1:
            raise OSError("injected: the tmpfs write failed")
        return real_finalize(txn, *args, **kwargs)

    transaction.SaveTransaction.finalize = failing_finalize  # type: ignore[method-assign]
    queue = AsyncCallsQueue(persistent=False)
    cid40 = mm.checkpoint_id(node, "job", 40)
    queue.schedule_async_request(mm.save(sharded_state(rank, world, 40, "rows"), cid40, strategy))
    try:
        queue.maybe_finalize_async_calls(blocking=True)
        out["failed_40"] = None
    except Exception as e:
        out["failed_40"] = f"{type(e).__name__}: {e}"
    finally:
        transaction.SaveTransaction.finalize = real_finalize  # type: ignore[method-assign]
    dist.barrier()
    out["step_40_left"] = Path(cid40).exists()
    assert mm.latest_checkpoint(node, "job", replication=rep) == cid

    # Node loss: node 1's processes restart and its memory is gone
    mm.close()
    dist.barrier()
    if rank == 1:
        shutil.rmtree(node)
    dist.barrier()
    latest, loaded = _load(node, rank, world, "rows", rep)
    assert latest == cid, latest
    check_loaded(loaded, rank, world, 30, "rows")
    out["common"] = dc.load_common_state_dict(latest)["iteration"]
    mm.close()  # waits for the background restoring the lost copies
    dist.barrier()
    out["recovered_files"] = sorted(p.name for p in Path(cid).iterdir())
    return out


def save_rows(rank: int, world: int, base: str) -> bool:
    """Save step 7 with the ``rows`` layout (one node)."""
    cid = mm.checkpoint_id(base, "job", 7)
    mm.save(sharded_state(rank, world, 7, "rows"), cid, mm.MemoryAsyncSaveStrategy(),
            async_sharded_save=False)  # fmt: skip
    mm.close()
    return True


def load_cols(rank: int, world: int, base: str, saved_world: int) -> bool:
    """Load the newest step with the ``cols`` layout into another world size."""
    _, loaded = _load(Path(base), rank, world, "cols", None, saved_world)
    check_loaded(loaded, rank, world, 7, "cols", saved_world)
    mm.close()
    return True


def save_steps_two_nodes(rank: int, world: int, base: str, steps: list[int]) -> bool:
    """Steps saved on two simulated nodes (one rank each) with pairwise replication."""
    patch_megatron_cuda()
    node = Path(base) / os.environ["MEMCKPT_NODE_ID"]
    strategy = mm.MemoryAsyncSaveStrategy(replication="pairwise")
    for step in steps:
        mm.save(sharded_state(rank, world, step, "rows"), mm.checkpoint_id(node, "job", step),
                strategy, async_sharded_save=False)  # fmt: skip
    mm.close()
    return True


def load_damaged_newest(rank: int, world: int, base: str) -> dict[str, Any]:
    """The newest step is damaged in every copy: one failed load, then latest moves on."""
    patch_megatron_cuda()
    node = Path(base) / os.environ["MEMCKPT_NODE_ID"]
    first = mm.latest_checkpoint(node, "job")
    failed = ""
    try:
        dc.load(sharded_state(rank, world, 0, "rows", empty=True), first,
                mm.MemoryLoadShardedStrategy())  # fmt: skip
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        failed = f"{type(e).__name__}: {e}"
    second = mm.latest_checkpoint(node, "job")
    loaded = dc.load(sharded_state(rank, world, 0, "rows", empty=True), second,
                     mm.MemoryLoadShardedStrategy())  # fmt: skip
    check_loaded(loaded, rank, world, 20, "rows")
    mm.close()
    return {"first": Path(first or "").name, "failed": failed, "second": Path(second or "").name}


def load_named_step(rank: int, world: int, base: str, step: int, how: str) -> str:
    """A restart loads ``step`` by name, on a replaced node too.

    ``how="prepare"``: through ``prepare_checkpoint``; ``"latest"``: the restart lines call
    ``latest_checkpoint`` (which prepares every complete step), then the step's plain id.
    """
    patch_megatron_cuda()
    node = Path(base) / os.environ["MEMCKPT_NODE_ID"]
    if how == "prepare":
        cid = mm.prepare_checkpoint(node, "job", step)
    else:
        mm.latest_checkpoint(node, "job")
        cid = mm.checkpoint_id(node, "job", step)
    loaded = dc.load(sharded_state(rank, world, 0, "rows", empty=True), cid,
                     mm.MemoryLoadShardedStrategy())  # fmt: skip
    check_loaded(loaded, rank, world, step, "rows")
    mm.close()
    return Path(cid).name
