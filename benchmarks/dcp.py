"""DCP through memckpt's memory tier against DCP's own FileSystemWriter/Reader, side by side.

    python benchmarks/dcp.py [--size-mib 1024] [--tensors 16] [--repeats 5] [--quick]
                             [--async-only] [--device cuda]

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
- ``memcpy``: a plain memcpy (one ``memmove`` per tensor, one thread) of the state into a
  pre-faulted tmpfs mapping of the same size (every rank at once, as the saves run):
  what one staging copy costs here;
- ``dcp.async_save`` blocking time (until it returns) with the THREAD and PROCESS
  checkpointers, for both writers, and its total time (until the future is done: the
  step is committed); each future is waited for before the next repeat (two untimed
  warm-ups each, as for dcp.save: the first PROCESS one starts DCP's checkpoint
  daemon, which opens its own memckpt runtime).

``--async-only`` times memcpy and the async rows alone (no save, load or reshard rows).

``--device cuda`` (one process, one GPU) times staging CUDA tensors instead: a raw
``copy_(non_blocking=True)`` into pinned host memory, DCP's ``DefaultStager`` with pinned
memory, and ``dcp.async_save`` through memckpt (device-to-host into its registered
tmpfs buffer), each until the copies are done and async_save returned.

Then an FSDP2 model of about ``--reshard-mib`` MiB (nn.Sequential of bias-free Linear
layers, one per tensor) is saved by 4 ranks through both writers and loaded by 2
ranks through both readers (DCP reshards); the 2-rank load time is reported.

GB/s counts the bytes of all ranks together. Prints medians and the ratios the
project targets.
"""

from __future__ import annotations

import argparse
import ctypes
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


def memcpy_times(
    state: dict[str, torch.Tensor], work: Path, rank: int, repeats: int
) -> list[float]:
    """Seconds of a memcpy of ``state`` into a pre-faulted tmpfs mapping (every rank at once)."""
    import mmap

    total = sum(t.numel() * t.element_size() for t in state.values())
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"memcpy-{rank}.buf"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, total)
        mm = mmap.mmap(fd, total, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        holder = [torch.frombuffer(mm, dtype=torch.uint8)]
        holder[0].fill_(0)  # pre-fault
        times: Times = defaultdict(list)

        def copy() -> None:
            # one plain memmove per tensor: torch's copy_ runs an OpenMP team, which slows
            # down many times over when another process holds a core of a small machine
            dst = holder[0].data_ptr()
            for t in state.values():
                n = t.numel() * t.element_size()
                ctypes.memmove(dst, t.data_ptr(), n)
                dst += n

        copy()  # warm-up
        for _ in range(repeats):
            timed(times, "memcpy", copy)
        holder.clear()
        mm.close()
        return times["memcpy"]
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


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

    times["memcpy"] = memcpy_times(state, work, rank, a.repeats)
    step = 0
    if a.async_only:
        bench_async(rank, a, state, work, mem, times, step)
        return dict(times)
    # 1. warm dcp.save through memckpt; 2. dcp.save with FileSystemWriter to a new dir
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
    bench_async(rank, a, state, work, mem, times, step)
    return dict(times)


def bench_async(
    rank: int, a: argparse.Namespace, state: dict[str, torch.Tensor], work: Path, mem: Path,
    times: Times, step: int,
) -> None:  # fmt: skip
    """4. async_save blocking time, and its total; each future is done before the next one."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    def mem_writer() -> mdcp.MemoryStorageWriter:
        return mdcp.MemoryStorageWriter(keep_last=1)

    def fs_writer(d: Path) -> dcp.FileSystemWriter:
        return dcp.FileSystemWriter(d, thread_count=a.fs_threads)

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
                total = time.perf_counter() - t0
                if i >= 2:
                    times[f"{kind} async {mode.value}"].append(dt)
                    times[f"{kind} async {mode.value} total"].append(total)
                if kind == "fs":
                    rm_on_rank0(rank, Path(cid))
    stop_dcp_daemon()
    dist.barrier()
    mdcp.close()


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


# -- CUDA staging (one process, one GPU) ----------------------------------------------------
def cuda_rank(rank: int, world: int, a: argparse.Namespace, base: str) -> Times:
    """Staging CUDA tensors three ways; each timed until the host copy is complete."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    state = {k: v.cuda() for k, v in make_state(rank, a.size_mib, a.tensors).items()}
    total = sum(t.numel() * t.element_size() for t in state.values())
    times: Times = defaultdict(list)
    holder = [torch.empty(total, dtype=torch.uint8, pin_memory=True)]

    def raw() -> None:
        pinned, off = holder[0], 0
        for t in state.values():
            n = t.numel() * t.element_size()
            pinned[off : off + n].view(t.dtype).copy_(t, non_blocking=True)
            off += n
        torch.cuda.synchronize()

    for i in range(a.repeats + 1):
        timed(times if i else defaultdict(list), "raw pinned copy_", raw)
    holder.clear()  # unpinned before the others pin their own
    stager = DefaultStager(
        StagingOptions(
            use_pinned_memory=True,
            use_shared_memory=False,
            use_async_staging=False,
            use_non_blocking_copy=True,
        )
    )
    for i in range(a.repeats + 1):  # the first allocates its pinned copy
        timed(times if i else defaultdict(list), "DefaultStager pinned", stager.stage, state)
    stager.close()
    mem = Path(base) / "cuda"
    for i in range(a.repeats + 2):
        cid = mdcp.checkpoint_id(mem, JOB, i)
        dist.barrier()
        t0 = time.perf_counter()
        fut = dcp.async_save(state, checkpoint_id=cid,
                             storage_writer=mdcp.MemoryStorageWriter(keep_last=1))  # fmt: skip
        dt = time.perf_counter() - t0  # synchronize_after_stage: the copies are done
        result(fut)
        if i >= 2:  # two warm-ups: the buffers are allocated and registered
            times["memckpt async_save (D2H into its buffer)"].append(dt)
            times["memckpt async_save total"].append(time.perf_counter() - t0)
    mdcp.close()
    return dict(times)


def cuda_main(a: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here (torch.cuda.is_available() "
                         "is False)")  # fmt: skip
    base = tempfile.mkdtemp(prefix="memckpt-bench-dcp-", dir=a.dir)
    try:
        times = run_world(cuda_rank, 1, a, base, cleanup=mdcp.close)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    gb = a.size_mib * (1 << 20) / 1e9
    print(f"\n{a.size_mib} MiB in {a.tensors} float32 CUDA tensors "
          f"({torch.cuda.get_device_name()}), {a.dir}, median of {a.repeats}, torch "
          f"{torch.__version__}")  # fmt: skip
    print(f"{'staging CUDA tensors':52s} {'seconds':>9s} {'GB/s':>7s}")
    for k, v in med.items():
        print(f"{k:52s} {v:9.3f} {gb / v:7.2f}")
    ratios = {
        "memckpt async_save blocking / raw pinned copy_ (target <= 1.2)":
            med["memckpt async_save (D2H into its buffer)"] / med["raw pinned copy_"],
        "memckpt async_save blocking / DefaultStager pinned":
            med["memckpt async_save (D2H into its buffer)"] / med["DefaultStager pinned"],
    }  # fmt: skip
    print()
    for k, v in ratios.items():
        print(f"{k:86s} {v:6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"seconds": med, "ratios": ratios}, indent=2))


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
    p.add_argument("--async-only", action="store_true", help="memcpy and the async rows only")
    p.add_argument("--worlds", default="1,2", help="rank counts of the per-rank rows")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the CUDA staging rows only (one GPU)")  # fmt: skip
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args()
    a.size_mib = a.size_mib or (256 if a.quick else 1024)
    a.repeats = a.repeats or (3 if a.quick else 5)
    a.reshard_mib = a.reshard_mib or (64 if a.quick else 256)
    if a.device == "cuda":
        cuda_main(a)
        return

    rows = {
        "memcpy": "memcpy into a pre-faulted tmpfs mapping",
        "mem save": "warm dcp.save, MemoryStorageWriter",
        "fs save": "dcp.save, FileSystemWriter (new dir)",
        "mem load": "dcp.load, MemoryStorageReader",
        "fs load": "dcp.load, FileSystemReader",
        "mem async thread": "async_save blocking, memckpt, thread",
        "fs async thread": "async_save blocking, FS, thread",
        "mem async process": "async_save blocking, memckpt, process",
        "fs async process": "async_save blocking, FS, process",
        "mem async thread total": "async_save to committed, memckpt, thread",
        "fs async thread total": "async_save to done, FS, thread",
        "mem async process total": "async_save to committed, memckpt, process",
        "fs async process total": "async_save to done, FS, process",
    }
    r: dict[str, float] = {}
    samples: dict[str, list[float]] = {}
    gb: dict[str, float] = {}
    ratios: dict[str, float] = {}
    nbytes = 0
    base = tempfile.mkdtemp(prefix="memckpt-bench-dcp-", dir=a.dir)
    t_start = time.perf_counter()
    try:
        for world in (int(w) for w in a.worlds.split(",")):
            times = run_world(bench_rank, world, a, base, cleanup=mdcp.close)
            samples |= {f"{k} ({world}r)": v for k, v in times.items()}
            for key, label in rows.items():
                if key not in times:
                    continue
                name = f"{label} ({world}r)"
                r[name] = statistics.median(times[key])
                gb[name] = world * a.size_mib * (1 << 20) / 1e9
            w = f"{world} rank{'s' if world > 1 else ''}"
            med = {k: statistics.median(v) for k, v in times.items()}
            for mode in ("thread", "process"):
                ratios |= {
                    f"async_save blocking / memcpy, {mode}, {w} (target <= 1.2)":
                        med[f"mem async {mode}"] / med["memcpy"],
                    f"async_save blocking: FileSystemWriter / memckpt, {mode}, {w} "
                    "(target >= 3.5)": med[f"fs async {mode}"] / med[f"mem async {mode}"],
                }  # fmt: skip
            if not a.async_only:
                ratios |= {
                    f"warm dcp.save speedup vs FileSystemWriter, {w} (target >= 4)":
                        med["fs save"] / med["mem save"],
                    f"dcp.load speedup vs FileSystemReader, {w} (target >= 3)":
                        med["fs load"] / med["mem load"],
                }  # fmt: skip
        if not a.async_only:
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

    reshard = "" if a.async_only else f", reshard model {nbytes / (1 << 20):.0f} MiB"
    print(f"\n{a.size_mib} MiB per rank in {a.tensors} float32 tensors{reshard}, {a.dir}, "
          f"median of {a.repeats}, torch {torch.__version__}, {os.cpu_count()} cores, "
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
