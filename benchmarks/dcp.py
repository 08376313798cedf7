"""DCP through memckpt's memory tier against DCP's own FileSystemWriter/Reader, side by side.

    python benchmarks/dcp.py [--size-mib 1024] [--tensors 16] [--repeats 5] [--quick]

Every rank is a spawned gloo process on this node (no replication); all files go to
one tmpfs directory (default /dev/shm), the DCP directories included. For 1 and for
2 ranks, each rank holds ``--size-mib`` MiB in ``--tensors`` float32 tensors under its
own keys, and rank 0 times, after a barrier:

- warm ``dcp.save`` through MemoryStorageWriter (keep_last=1; two untimed warm-up
  saves first, so the pool holds its pre-faulted buffers), and ``dcp.save`` with
  FileSystemWriter to a new directory each time;
- ``dcp.load`` into the existing (zeroed) tensors through MemoryStorageReader (the
  latest step) and through FileSystemReader, alternating, after one untimed load
  through each; values are checked after every load;
- ``dcp.async_save`` blocking time (until it returns) with the THREAD and PROCESS
  checkpointers, for both writers; each future is waited for, untimed, before the
  next repeat (two untimed warm-ups each, as for dcp.save: the first PROCESS one
  starts DCP's checkpoint daemon, which opens its own memckpt runtime).

Then an FSDP2 model of about ``--reshard-mib`` MiB (nn.Sequential of bias-free Linear
layers, one per tensor) is saved by 4 ranks through both writers and loaded by 2
ranks through both readers (DCP reshards); the 2-rank load time is reported.

GB/s counts the bytes of all ranks together. Prints medians and the ratios the
project targets.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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
import torch.distributed.checkpoint as dcp
from gloo_world import run_world

from memckpt.adapters import dcp as mdcp

# DCP warns on every call in a single-process group and about some of its options
warnings.filterwarnings("ignore", category=UserWarning)
# DCP's PROCESS-mode daemon (which imports this file) sets the root logger to INFO and
# logs every request there; keep warnings and errors, from memckpt too
logging.getLogger().addFilter(lambda record: record.levelno >= logging.WARNING)
logging.getLogger("memckpt").setLevel(logging.WARNING)

JOB = "bench"
Times = dict[str, list[float]]


def make_state(rank: int, size_mib: int, n: int) -> dict[str, torch.Tensor]:
    per = size_mib * (1 << 20) // 4 // n
    g = torch.Generator().manual_seed(rank)
    return {f"r{rank}.layer{i}": torch.empty(per).uniform_(-1, 1, generator=g) for i in range(n)}


def checksums(tensors: Any) -> list[int]:
    """Order-independent integer sums of the bits: exact, cheap, and 0 after zero_()."""
    return [int(t.view(torch.int32).sum(dtype=torch.int64)) for t in tensors]


def zero(tensors: Any) -> None:
    with torch.no_grad():
        for t in tensors:
            t.zero_()


def result(fut: Any) -> None:
    """Wait for an async_save (a Future, or an AsyncSaveResponse on newer torch)."""
    getattr(fut, "upload_completion", fut).result(timeout=900)


def timed(times: Times, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Time ``fn(*args, **kwargs)`` after a barrier; append the seconds to ``times[name]``."""
    dist.barrier()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    times[name].append(time.perf_counter() - t0)
    return out


def rm_on_rank0(rank: int, path: Path) -> None:
    """Remove ``path`` once every rank is done with it."""
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def stop_dcp_daemon() -> None:
    """Stop DCP's PROCESS-mode checkpoint daemon of this rank, if it started one."""
    from torch.distributed.checkpoint import _async_process_executor as ape

    proc, ape._CHECKPOINT_PROCESS = ape._CHECKPOINT_PROCESS, None
    if proc is not None:
        proc.__del__()  # sends TERMINATE and joins; the daemon then closes memckpt


# -- the 1- and 2-rank rows ------------------------------------------------------------------
def bench_rank(rank: int, world: int, a: argparse.Namespace, base: str) -> Times:
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    work = Path(base) / f"world{world}"
    mem = work / "mem"
    state = make_state(rank, a.size_mib, a.tensors)
    want = checksums(state.values())
    times: Times = defaultdict(list)

    def mem_writer() -> mdcp.MemoryStorageWriter:
        return mdcp.MemoryStorageWriter(keep_last=1)

    def fs_writer(d: Path) -> dcp.FileSystemWriter:
        return dcp.FileSystemWriter(d, thread_count=a.fs_threads)

    def check(what: str) -> None:
        assert checksums(state.values()) == want, f"rank {rank}: {what} loaded wrong values"

    # 1. warm dcp.save through memckpt; 2. dcp.save with FileSystemWriter to a new dir
    step = 0
    for i in range(a.repeats + 2):
        cid, writer = mdcp.checkpoint_id(mem, JOB, step), mem_writer()
        if i < 2:  # warm-up: the first save allocates, then the pool pre-faults a spare
            dcp.save(state, checkpoint_id=cid, storage_writer=writer)
        else:
            timed(times, "mem save", dcp.save, state, checkpoint_id=cid, storage_writer=writer)
        step += 1
    fs_dir = work / "fs-0"
    for i in range(a.repeats):
        if i:
            rm_on_rank0(rank, fs_dir)
        fs_dir = work / f"fs-{i}"
        writer = fs_writer(fs_dir)
        timed(times, "fs save", dcp.save, state, checkpoint_id=fs_dir, storage_writer=writer)

    # 3. dcp.load into the existing tensors (zeroed first, checked after)
    latest = mdcp.latest_checkpoint(mem, JOB)
    assert latest == mdcp.checkpoint_id(mem, JOB, step - 1), latest
    for i in range(a.repeats + 1):  # the first of each is a warm-up
        for kind in ("mem", "fs"):
            zero(state.values())
            if kind == "mem":
                cid, reader = latest, mdcp.MemoryStorageReader()
            else:
                cid, reader = str(fs_dir), dcp.FileSystemReader(fs_dir)
            timed(times if i else defaultdict(list), f"{kind} load", dcp.load, state,
                  checkpoint_id=cid, storage_reader=reader)  # fmt: skip
            check(type(reader).__name__)
    rm_on_rank0(rank, fs_dir)

    # 4. async_save blocking time; the future is waited for, untimed, before the next one
    pg = dist.new_group(backend="gloo")
    job = JOB
    n_fs = 0
    for mode in (AsyncCheckpointerType.THREAD, AsyncCheckpointerType.PROCESS):
        if mode == AsyncCheckpointerType.PROCESS:
            # the daemon opens its own runtime: give it a job of its own, and free the
            # buffers of this process's job first
            mdcp.close(mem, job)
            rm_on_rank0(rank, mem / job)
            job, step = f"{JOB}-proc", 0
        for kind in ("mem", "fs"):
            for i in range(a.repeats + 2):  # the first two are warm-ups
                if kind == "mem":
                    cid, writer = mdcp.checkpoint_id(mem, job, step), mem_writer()
                    step += 1
                else:
                    d = work / f"async-fs-{n_fs}"
                    cid, writer = str(d), fs_writer(d)
                    n_fs += 1
                dist.barrier()
                t0 = time.perf_counter()
                fut = dcp.async_save(state, checkpoint_id=cid, storage_writer=writer,
                                     process_group=pg, async_checkpointer_type=mode)  # fmt: skip
                dt = time.perf_counter() - t0
                result(fut)
                if i >= 2:
                    times[f"{kind} async {mode.value}"].append(dt)
                if kind == "fs":
                    rm_on_rank0(rank, Path(cid))
    stop_dcp_daemon()
    dist.barrier()
    mdcp.close()
    return dict(times)


# -- the 4 -> 2 reshard rows -----------------------------------------------------------------
def fsdp_model(world: int, mib: int, n: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    d = math.isqrt(mib * (1 << 20) // 4 // n) // 8 * 8  # a multiple of every world size
    with torch.device("meta"):
        model = torch.nn.Sequential(*(torch.nn.Linear(d, d, bias=False) for _ in range(n)))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    return model


def local_shards(sd: dict[str, Any]) -> list[torch.Tensor]:
    return [v.to_local() for v in sd.values()]


def reshard_save(rank: int, world: int, a: argparse.Namespace, base: str) -> int:
    model = fsdp_model(world, a.reshard_mib, a.tensors)
    sd = model.state_dict()  # DTensors, sharded along dim 0
    g = torch.Generator().manual_seed(1000 + rank)
    with torch.no_grad():
        for t in local_shards(sd):
            t.uniform_(-1, 1, generator=g)
    root = Path(base) / "reshard"
    dcp.save(sd, checkpoint_id=mdcp.checkpoint_id(root / "mem", JOB, 1),
             storage_writer=mdcp.MemoryStorageWriter(keep_last=1))  # fmt: skip
    dcp.save(sd, checkpoint_id=root / "fs", storage_writer=dcp.FileSystemWriter(root / "fs"))
    mdcp.close()
    return sum(v.numel() * v.element_size() for v in sd.values())  # global bytes


def reshard_load(rank: int, world: int, a: argparse.Namespace, base: str) -> Times:
    model = fsdp_model(world, a.reshard_mib, a.tensors)
    sd = model.state_dict()
    root = Path(base) / "reshard"
    times: Times = defaultdict(list)
    latest = mdcp.latest_checkpoint(root / "mem", JOB)
    assert latest == mdcp.checkpoint_id(root / "mem", JOB, 1), latest
    want = None
    for kind in ("fs", "mem"):  # DCP's own reader first: it gives the reference values
        for _ in range(a.repeats):
            zero(local_shards(sd))
            if kind == "fs":
                reader, cid = dcp.FileSystemReader(root / "fs"), str(root / "fs")
            else:
                reader, cid = mdcp.MemoryStorageReader(), latest
            timed(times, f"{kind} reshard load", dcp.load, sd, checkpoint_id=cid,
                  storage_reader=reader)  # fmt: skip
            got = checksums(local_shards(sd))
            want = want or got
            assert got == want and any(got), f"rank {rank}: {kind} reshard load differs"
    dist.barrier()
    mdcp.close()
    return dict(times)


# -- spawning ranks --------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, help="MiB per rank (default 1024; --quick 256)")
    p.add_argument("--tensors", type=int, default=16)
    p.add_argument("--repeats", type=int, help="default 5; --quick 3")
    p.add_argument("--reshard-mib", type=int, help="FSDP2 model size (default 256; --quick 64)")
    p.add_argument("--fs-threads", type=int, default=1, help="FileSystemWriter thread_count")
    p.add_argument("--dir", default="/dev/shm")
    p.add_argument("--quick", action="store_true", help="a fast check with small sizes")
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args()
    a.size_mib = a.size_mib or (256 if a.quick else 1024)
    a.repeats = a.repeats or (3 if a.quick else 5)
    a.reshard_mib = a.reshard_mib or (64 if a.quick else 256)

    rows = {
        "mem save": "warm dcp.save, MemoryStorageWriter",
        "fs save": "dcp.save, FileSystemWriter (new dir)",
        "mem load": "dcp.load, MemoryStorageReader",
        "fs load": "dcp.load, FileSystemReader",
        "mem async thread": "async_save blocking, memckpt, thread",
        "fs async thread": "async_save blocking, FS, thread",
        "mem async process": "async_save blocking, memckpt, process",
        "fs async process": "async_save blocking, FS, process",
    }
    r: dict[str, float] = {}
    samples: dict[str, list[float]] = {}
    gb: dict[str, float] = {}
    ratios: dict[str, float] = {}
    base = tempfile.mkdtemp(prefix="memckpt-bench-dcp-", dir=a.dir)
    t_start = time.perf_counter()
    try:
        for world in (1, 2):
            times = run_world(bench_rank, world, a, base, cleanup=mdcp.close)
            samples |= {f"{k} ({world}r)": v for k, v in times.items()}
            for key, label in rows.items():
                name = f"{label} ({world}r)"
                r[name] = statistics.median(times[key])
                gb[name] = world * a.size_mib * (1 << 20) / 1e9
            w = f"{world} rank{'s' if world > 1 else ''}"
            med = {k: statistics.median(v) for k, v in times.items()}
            ratios |= {
                f"warm dcp.save speedup vs FileSystemWriter, {w} (target >= 4)":
                    med["fs save"] / med["mem save"],
                f"dcp.load speedup vs FileSystemReader, {w} (target >= 3)":
                    med["fs load"] / med["mem load"],
                f"async_save blocking: memckpt / DCP FileSystemWriter, thread, {w} "
                "(target <= 1.0)": med["mem async thread"] / med["fs async thread"],
                f"async_save blocking: memckpt / DCP FileSystemWriter, process, {w} "
                "(target <= 1.0)": med["mem async process"] / med["fs async process"],
            }  # fmt: skip
        nbytes = run_world(reshard_save, 4, a, base, cleanup=mdcp.close)
        times = run_world(reshard_load, 2, a, base, cleanup=mdcp.close)
        samples |= {f"{k} (2r)": v for k, v in times.items()}
        for key, label in (("mem", "MemoryStorageReader"), ("fs", "FileSystemReader")):
            name = f"4->2 reshard dcp.load, {label} (2r)"
            r[name] = statistics.median(times[f"{key} reshard load"])
            gb[name] = nbytes / 1e9
        ratios["4->2 reshard load: FileSystemReader / memckpt"] = (
            r["4->2 reshard dcp.load, FileSystemReader (2r)"]
            / r["4->2 reshard dcp.load, MemoryStorageReader (2r)"]
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"\n{a.size_mib} MiB per rank in {a.tensors} float32 tensors, reshard model "
          f"{nbytes / (1 << 20):.0f} MiB, {a.dir}, median of {a.repeats}, torch "
          f"{torch.__version__}, {os.cpu_count()} cores, "
          f"{time.perf_counter() - t_start:.0f} s in all")  # fmt: skip
    print(f"{'operation (Nr: N ranks; GB/s: all ranks together)':52s} {'seconds':>9s} "
          f"{'GB/s':>7s}")  # fmt: skip
    for k, v in r.items():
        print(f"{k:52s} {v:9.3f} {gb[k] / v:7.2f}")
    print()
    for k, v in ratios.items():
        print(f"{k:86s} {v:6.2f}")
    if a.json:
        doc = {"seconds": r, "ratios": ratios, "samples_rank0": samples}
        Path(a.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
