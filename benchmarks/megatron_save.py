"""Megatron-Core async saves: memckpt's save strategy against Megatron's torch_dist, same tmpfs.

    python benchmarks/megatron_save.py [--size-mib 1024] [--tensors 16] [--repeats 5]
                                        [--dir /dev/shm]

Two spawned gloo ranks on this node (no replication). Each rank holds ``--size-mib``
MiB in ``--tensors`` float32 ShardedTensors, each the rank's half (axis 0) of a global
tensor. Both strategies save asynchronously the way a Megatron-LM loop does: the
save call returns an AsyncRequest, Megatron's ``AsyncCallsQueue(persistent=False)``
schedules it (forking the checkpoint process), and ``maybe_finalize_async_calls``
completes it. Rank 0 times, after a barrier:

- blocking: from the save call until ``schedule_async_request`` returns (what the
  training loop waits for);
- total: until ``maybe_finalize_async_calls(blocking=True)`` returns (the step is
  complete: memckpt's is committed on every rank, torch_dist's files and
  ``metadata.json`` are written).

memckpt: ``memckpt.adapters.megatron.save`` with ``MemoryAsyncSaveStrategy(keep_last=1)``,
two untimed warm-up saves first (the pool then holds pre-faulted buffers).
torch_dist: ``dist_checkpointing.save(..., async_sharded_save=True)`` with Megatron's
default strategy, one strategy object for all saves (as Megatron-LM keeps it), to a
new directory on the same tmpfs each time (removed, untimed, after), one warm-up.
After the timed saves each side's newest checkpoint is loaded back and checked.

Prints medians (and GB/s of both ranks' bytes) and the torch_dist / memckpt ratios;
the project targets >= 4 for both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from gloo_world import run_world

warnings.filterwarnings("ignore")  # megatron warns at import without apex / transformer-engine

JOB = "bench"
Times = dict[str, list[float]]


def patch_megatron_cuda() -> None:
    """Let Megatron's CUDA-only code run on a CPU machine (a no-op where CUDA exists).

    Megatron's AsyncCallsQueue calls ``torch.cuda.synchronize()`` before it forks and
    all-reduces its completion flag on ``torch.cuda.current_device()``; torch_dist's save
    calls ``torch.cuda.synchronize()``. All raise on a CPU-only torch. memckpt's strategy
    calls neither; both sides run under the same patch.
    """
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


def make_state(rank: int, world: int, size_mib: int, n: int) -> dict[str, Any]:
    from megatron.core.dist_checkpointing import ShardedTensor

    per = size_mib * (1 << 20) // 4 // n
    g = torch.Generator().manual_seed(rank)
    return {
        f"layer{i}": ShardedTensor.from_rank_offsets(
            f"layer{i}", torch.empty(per).uniform_(-1, 1, generator=g), (0, rank, world)
        )
        for i in range(n)
    }


def checksums(state: dict[str, Any]) -> list[int]:
    """Integer sums of the bits: exact, cheap, and 0 after zero_()."""
    return [int(v.data.view(torch.int32).sum(dtype=torch.int64)) for v in state.values()]


def bench_rank(rank: int, world: int, a: argparse.Namespace, base: str) -> Times:
    from megatron.core import dist_checkpointing as dc
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from memckpt.adapters import megatron as mm

    patch_megatron_cuda()
    work = Path(base)
    state = make_state(rank, world, a.size_mib, a.tensors)
    want = checksums(state)
    times: Times = defaultdict(list)
    calls = AsyncCallsQueue(persistent=False)

    def timed_save(kind: str, save: Callable[[], Any], keep: bool) -> None:
        dist.barrier()
        t0 = time.perf_counter()
        calls.schedule_async_request(save())
        t1 = time.perf_counter()
        calls.maybe_finalize_async_calls(blocking=True)
        t2 = time.perf_counter()
        if keep:
            times[f"{kind} blocking"].append(t1 - t0)
            times[f"{kind} total"].append(t2 - t0)

    strategy = mm.MemoryAsyncSaveStrategy(keep_last=1)
    mem = work / "mem"
    for step in range(a.repeats + 2):
        cid = mm.checkpoint_id(mem, JOB, step)
        timed_save("memckpt", lambda c=cid: mm.save(state, c, strategy), keep=step >= 2)

    torch_dist = get_default_save_sharded_strategy()
    last = None
    for i in range(a.repeats + 1):
        d = work / f"torch_dist-{i}"
        d.mkdir(parents=True, exist_ok=True)
        save = lambda d=d: dc.save(state, str(d), torch_dist, async_sharded_save=True)  # noqa: E731
        timed_save("torch_dist", save, keep=i >= 1)
        if last is not None:
            dist.barrier()
            if rank == 0:
                shutil.rmtree(last, ignore_errors=True)
        last = d

    # both sides wrote what they hold: load each back into zeroed tensors and compare
    for v in state.values():
        v.data.zero_()
    latest = mm.latest_checkpoint(mem, JOB)
    assert latest == mm.checkpoint_id(mem, JOB, a.repeats + 1), latest
    loaded = dc.load(state, latest, mm.MemoryLoadShardedStrategy())
    assert [int(loaded[k].view(torch.int32).sum(dtype=torch.int64)) for k in state] == want
    loaded = dc.load(state, str(last))
    assert [int(loaded[k].view(torch.int32).sum(dtype=torch.int64)) for k in state] == want
    calls.close()
    mm.close()
    return dict(times)


# -- spawning ranks --------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024, help="MiB per rank")
    p.add_argument("--tensors", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default="/dev/shm", help="the tmpfs both strategies write to")
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args()
    world = 2
    base = tempfile.mkdtemp(prefix="memckpt-bench-megatron-", dir=a.dir)
    t_start = time.perf_counter()
    try:
        times = run_world(bench_rank, world, a, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    nbytes = world * a.size_mib * (1 << 20)
    print(f"\n{a.size_mib} MiB per rank x {world} ranks in {a.tensors} float32 ShardedTensors, "
          f"{a.dir}, median of {a.repeats}, torch {torch.__version__}, {os.cpu_count()} cores, "
          f"{time.perf_counter() - t_start:.0f} s in all")  # fmt: skip
    print(f"{'async save through AsyncCallsQueue':40s} {'seconds':>9s} {'GB/s':>7s}")
    for k, v in med.items():
        print(f"{k:40s} {v:9.3f} {nbytes / v / 1e9:7.2f}")
    ratios = {
        f"{what} time: torch_dist / memckpt (target >= 4)":
            med[f"torch_dist {what}"] / med[f"memckpt {what}"]
        for what in ("blocking", "total")
    }  # fmt: skip
    print()
    for k, v in ratios.items():
        print(f"{k:60s} {v:6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"seconds": med, "ratios": ratios,
                                            "samples_rank0": times}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
