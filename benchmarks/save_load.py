"""Save/load speed of memckpt against raw memcpy, torch.save and DCP, side by side.

    python benchmarks/save_load.py [--size-mib 1024] [--tensors 16] [--repeats 5]
    python benchmarks/save_load.py --device cuda     # CUDA tensors: D2H staging


All files go to one tmpfs directory (default /dev/shm). The first save is a new
job's first (blocking) save on an empty directory, next to torch.save to a new file;
the mixed rows alternate async and blocking saves. Loads are timed in fresh
processes into tensors that already exist there, as a restarted job would do.
Prints medians and the ratios the project targets.

``--device cuda`` puts the tensors on the GPU and times memckpt's CUDA staging
(asynchronous device-to-host copies into its registered, pinned mapping) against a
raw ``copy_(non_blocking=True)`` into a pinned host tensor, then a load back into
the GPU tensors; it skips the CPU rows.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

import memckpt
from memckpt.storage.format import DEFAULT_CHUNK_SIZE
from memckpt.storage.pool import BufferPool
from memckpt.storage.statedict import flatten_state_dict
from memckpt.storage.writer import finalize, meta_estimate, plan_layout, stage

HERE = Path(__file__).resolve()


def make_state(size_mib: int, n: int) -> dict[str, torch.Tensor]:
    per = size_mib * (1 << 20) // 4 // n
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(n)}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_memcpy(state, work: Path, repeats: int) -> float:
    total = sum(t.numel() * t.element_size() for t in state.values())
    path = work / "raw.buf"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, total)
    mm = mmap.mmap(fd, total, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    holder = [torch.frombuffer(mm, dtype=torch.uint8)]
    holder[0].fill_(0)  # pre-fault

    def copy() -> None:
        buf, off = holder[0], 0
        for t in state.values():
            n = t.numel() * t.element_size()
            buf[off : off + n].view(t.dtype).copy_(t)
            off += n

    try:
        return median_time(copy, repeats)
    finally:
        holder.clear()  # drop the tensor's view of the mapping before closing it
        mm.close()
        os.close(fd)
        path.unlink()


def bench_torch_save(state, work: Path, repeats: int) -> float:
    """torch.save to a file that does not exist yet (fresh tmpfs pages); keeps the last one."""
    times = []
    for i in range(repeats):
        path = work / f"torch-{i}.pt"
        t0 = time.perf_counter()
        torch.save(state, path)
        times.append(time.perf_counter() - t0)
        path.replace(work / "torch.pt")  # for the load benchmark
    return statistics.median(times)


def bench_first_save(state, work: Path, repeats: int) -> float:
    """A job's very first save: a new manager on an empty directory, save(blocking=True)."""
    times = []
    for i in range(repeats):
        d = work / f"first{i}"
        # no pre-fault: it runs after the save returns, and would only slow the next repeat
        with memckpt.CheckpointManager(d, "bench", keep_last=1, prefault=False) as m:
            t0 = time.perf_counter()
            m.save(0, state, blocking=True)
            times.append(time.perf_counter() - t0)
        shutil.rmtree(d)
    return statistics.median(times)


def bench_cold_path(state, work: Path, repeats: int) -> float:
    """The cold path of a blocking first save alone, through the pool and writer.

    A fresh buffer (``acquire(cold_ok=True)``) written with pwrite from the tensors and
    hashed inline, then finalized; a save adds its commit and vote (milliseconds).
    """
    times = []
    for i in range(repeats):
        pool = BufferPool(work / f"cold{i}", rank=0)
        t0 = time.perf_counter()
        flat = flatten_state_dict(state)
        layout = plan_layout(flat, None)
        buf = pool.acquire(layout.data_end + meta_estimate(flat, DEFAULT_CHUNK_SIZE), cold_ok=True)
        staged = stage(flat, layout, buf, hash_inline=True)
        finalize(staged, job_id="bench", step=0, rank=0, world_size=1, durable=False)
        times.append(time.perf_counter() - t0)
        assert not buf.fresh, "the pool did not hand out a fresh buffer"
        pool.give_back(buf)
        pool.close()
        shutil.rmtree(work / f"cold{i}")
    return statistics.median(times)


def bench_dcp(state, work: Path, repeats: int, threads: int) -> float:
    def save() -> None:
        d = work / f"dcp{threads}"
        shutil.rmtree(d, ignore_errors=True)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(d, thread_count=threads))

    return median_time(save, repeats)


def bench_memckpt_save(state, work: Path, repeats: int) -> dict[str, float]:
    out = {}
    with memckpt.CheckpointManager(work / "mem", "bench", keep_last=1) as m:
        m.save(0, state, blocking=True)
        m.save(1, state, blocking=True)  # the spare buffer now exists and is pre-faulted
        step = [2]

        def warm() -> None:
            m.save(step[0], state, blocking=True)
            step[0] += 1

        out["warm"] = median_time(warm, repeats)
        blocking, total = [], []
        for _ in range(repeats):
            h = m.save(step[0], state)
            r = h.wait()
            step[0] += 1
            blocking.append(r.blocking_s)
            total.append(r.total_s)
        out["async_blocking"] = statistics.median(blocking)
        out["async_total"] = statistics.median(total)
        # async and blocking saves alternating, as a loop with a blocking save every
        # other checkpoint (before an eval, at an epoch end) does
        mixed_async, mixed_blocking = [], []
        for i in range(2 * repeats):
            t0 = time.perf_counter()
            if i % 2 == 0:
                h = m.save(step[0], state)
                mixed_async.append(time.perf_counter() - t0)
                h.wait()
            else:
                m.save(step[0], state, blocking=True)
                mixed_blocking.append(time.perf_counter() - t0)
            step[0] += 1
        out["mixed_async"] = statistics.median(mixed_async)
        out["mixed_blocking"] = statistics.median(mixed_blocking)
    return out


def fresh_process_load(kind: str, work: Path, size_mib: int, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, str(HERE), "--child-load", kind, "--work", str(work),
             "--size-mib", str(size_mib), "--tensors", str(n)],
            capture_output=True, text=True, check=True, timeout=600,
        ).stdout  # fmt: skip
        times.append(float(out.strip().splitlines()[-1]))
    return statistics.median(times)


def child_load(kind: str, work: Path, size_mib: int, n: int) -> None:
    """In a fresh process: build the destination tensors, then time one load into them."""
    dest = make_state(size_mib, n)
    for t in dest.values():
        t.zero_()
    t0 = time.perf_counter()
    if kind == "memckpt":
        with memckpt.CheckpointManager(work / "mem", "bench", keep_last=1, prefault=False) as m:
            m.load(state_dict=dest)
            dt = time.perf_counter() - t0
    elif kind == "torch_mmap":
        loaded = torch.load(work / "torch.pt", mmap=True, weights_only=True)
        for k, t in dest.items():
            t.copy_(loaded[k])
        dt = time.perf_counter() - t0
    elif kind == "dcp":
        dcp.load(dest, storage_reader=dcp.FileSystemReader(work / "dcp2"))
        dt = time.perf_counter() - t0
    else:
        raise SystemExit(f"unknown load kind {kind}")
    check = make_state(size_mib, n)
    assert all(torch.equal(dest[k], check[k]) for k in dest), f"{kind} loaded wrong values"
    print(dt)


def make_cuda_state(size_mib: int, n: int) -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in make_state(size_mib, n).items()}


def bench_cuda(state: dict[str, torch.Tensor], work: Path, repeats: int) -> dict[str, float]:
    """Seconds of D2H copies: raw into pinned memory, and memckpt's staging, save, load."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    holder = [torch.empty(total, dtype=torch.uint8, pin_memory=True)]

    def raw_copy() -> None:
        pinned, off = holder[0], 0
        for t in state.values():
            n = t.numel() * t.element_size()
            pinned[off : off + n].view(t.dtype).copy_(t, non_blocking=True)
            off += n
        torch.cuda.synchronize()

    raw_copy()  # warm-up
    out = {"raw pinned copy_": median_time(raw_copy, repeats)}
    holder.clear()  # unpin before memckpt pins its buffers
    with memckpt.CheckpointManager(work / "mem", "bench-cuda", keep_last=1) as m:
        m.save(0, state, blocking=True)
        m.save(1, state, blocking=True)  # both buffers exist, pinned (cudaHostRegister)
        step = [2]
        staged, returned, totals = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            h = m.save(step[0], state)
            returned.append(time.perf_counter() - t0)
            torch.cuda.synchronize()  # the copies were queued on the current stream
            staged.append(time.perf_counter() - t0)
            totals.append(h.wait().total_s)
            step[0] += 1

        def blocking() -> None:
            m.save(step[0], state, blocking=True)
            step[0] += 1

        out["memckpt D2H staging (save to copies done)"] = statistics.median(staged)
        out["memckpt async save: blocking"] = statistics.median(returned)
        out["memckpt async save: total"] = statistics.median(totals)
        out["memckpt blocking save"] = median_time(blocking, repeats)

        def load() -> None:
            m.load(state_dict=state)
            torch.cuda.synchronize()

        out["memckpt load into CUDA tensors"] = median_time(load, repeats)
    return out


def cuda_main(a: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")
    work = Path(tempfile.mkdtemp(prefix="memckpt-bench-", dir=a.dir))
    try:
        r = bench_cuda(make_cuda_state(a.size_mib, a.tensors), work, a.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = {
        "D2H staging throughput / raw pinned copy_ (target >= 0.9)": r["raw pinned copy_"]
        / r["memckpt D2H staging (save to copies done)"],
    }
    gib = a.size_mib / 1024
    print(f"\n{a.size_mib} MiB in {a.tensors} float32 CUDA tensors "
          f"({torch.cuda.get_device_name()}), {a.dir}, median of {a.repeats}, "
          f"torch {torch.__version__}")  # fmt: skip
    print(f"{'operation':42s} {'seconds':>9s} {'GB/s':>7s}")
    for k, v in r.items():
        print(f"{k:42s} {v:9.3f} {gib * (1 << 30) / 1e9 / v:7.2f}")
    print()
    for k, v in ratios.items():
        print(f"{k:58s} {v:6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"seconds": r, "ratios": ratios}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--tensors", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default="/dev/shm")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the tensors live (cuda: the D2H staging rows only)")  # fmt: skip
    p.add_argument("--child-load", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_load:
        child_load(a.child_load, Path(a.work), a.size_mib, a.tensors)
        return
    if a.device == "cuda":
        cuda_main(a)
        return
    work = Path(tempfile.mkdtemp(prefix="memckpt-bench-", dir=a.dir))
    try:
        state = make_state(a.size_mib, a.tensors)
        gib = a.size_mib / 1024
        r: dict[str, float] = {}
        r["memcpy"] = bench_memcpy(state, work, a.repeats)
        r["torch.save"] = bench_torch_save(state, work, a.repeats)
        r["dcp save (1 thread)"] = bench_dcp(state, work, a.repeats, 1)
        r["dcp save (2 threads)"] = bench_dcp(state, work, a.repeats, 2)
        r["memckpt first save (new job, blocking)"] = bench_first_save(state, work, a.repeats)
        r["memckpt first save, cold path only"] = bench_cold_path(state, work, a.repeats)
        mem = bench_memckpt_save(state, work, a.repeats)
        r["memckpt warm save (blocking)"] = mem["warm"]
        r["memckpt async save: blocking"] = mem["async_blocking"]
        r["memckpt async save: total"] = mem["async_total"]
        r["memckpt mixed: async save blocking"] = mem["mixed_async"]
        r["memckpt mixed: blocking save"] = mem["mixed_blocking"]
        del state
        r["torch.load(mmap)+copy (fresh proc)"] = fresh_process_load(
            "torch_mmap", work, a.size_mib, a.tensors, a.repeats
        )
        r["dcp.load (fresh proc)"] = fresh_process_load(
            "dcp", work, a.size_mib, a.tensors, a.repeats
        )
        r["memckpt load (fresh proc)"] = fresh_process_load(
            "memckpt", work, a.size_mib, a.tensors, a.repeats
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best_dcp = min(r["dcp save (1 thread)"], r["dcp save (2 threads)"])
    ratios = {
        "first save / torch.save to a new file (target <= 1)": r[
            "memckpt first save (new job, blocking)"
        ]
        / r["torch.save"],
        "cold path only / torch.save to a new file": r["memckpt first save, cold path only"]
        / r["torch.save"],
        "async blocking / memcpy (target <= 1.1)": r["memckpt async save: blocking"] / r["memcpy"],
        "mixed: async save blocking / memcpy (target <= 1.1)": r[
            "memckpt mixed: async save blocking"
        ]
        / r["memcpy"],
        "mixed: blocking save / memcpy (target <= 1.1)": r["memckpt mixed: blocking save"]
        / r["memcpy"],
        "warm save throughput / memcpy (target >= 0.7)": r["memcpy"]
        / r["memckpt warm save (blocking)"],
        "warm save throughput / best DCP (target >= 4)": best_dcp
        / r["memckpt warm save (blocking)"],
        "load throughput / torch.load(mmap)+copy (target >= 0.8)": r[
            "torch.load(mmap)+copy (fresh proc)"
        ]
        / r["memckpt load (fresh proc)"],
        "load throughput / dcp.load (target >= 3)": r["dcp.load (fresh proc)"]
        / r["memckpt load (fresh proc)"],
    }
    print(f"\n{a.size_mib} MiB in {a.tensors} float32 tensors, {a.dir}, median of {a.repeats}, "
          f"torch {torch.__version__}, {os.cpu_count()} cores")  # fmt: skip
    print(f"{'operation':42s} {'seconds':>9s} {'GB/s':>7s}")
    for k, v in r.items():
        print(f"{k:42s} {v:9.3f} {gib * (1 << 30) / 1e9 / v:7.2f}")
    print()
    for k, v in ratios.items():
        print(f"{k:58s} {v:6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"seconds": r, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
