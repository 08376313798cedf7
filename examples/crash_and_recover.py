"""Two ranks train with memory checkpoints, are killed mid-run, restart and recover.

    python examples/crash_and_recover.py [--steps 60] [--crash-at 37] [--every 5]

Phase 1 trains a small MLP with DDP on gloo (2 processes) and saves to /dev/shm
every few steps, then both processes are killed with SIGKILL at --crash-at (as a
machine failure would). Phase 2 starts two fresh processes that find the newest
complete checkpoint, load it in place, and finish training. A reference run
without a crash checks that the final weights are bit-identical.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import memckpt

log = logging.getLogger("example")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + rank)
    x = torch.randn(64, 32, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def worker(rank: int, world: int, port: int, base: str, args: argparse.Namespace, mode: str,
           out: str) -> None:  # fmt: skip
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mgr = memckpt.CheckpointManager(base, "example", keep_last=2, timeout_s=60)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 0}
    start = 0
    if mode == "resume":
        t0 = time.perf_counter()
        loaded = mgr.load(state_dict=state)
        if loaded is None:
            raise SystemExit("no memory checkpoint; a real job would read its disk checkpoint")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = state["step"]
        log.info("recovered step %d from memory in %.3fs", start, time.perf_counter() - t0)
    for step in range(start, args.steps):
        if mode == "crash" and step == args.crash_at:
            log.info("step %d: simulating a node failure (SIGKILL)", step)
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch(step, rank)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % args.every == 0:
            h = mgr.save(step + 1, {"model": model.state_dict(), "optim": opt.state_dict(),
                                    "step": step + 1})  # fmt: skip
            if rank == 0 and (step + 1) % (args.every * 4) == 0:
                r = h.wait()
                log.info("step %d loss %.4f saved (blocking %.2f ms)", step + 1, loss.item(),
                         r.blocking_s * 1e3)  # fmt: skip
    mgr.close()
    if rank == 0:
        torch.save(model.module.state_dict(), out)
    dist.destroy_process_group()


def run(mode: str, base: str, args: argparse.Namespace, out: str) -> int:
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(worker, args=(2, port, base, args, mode, out), nprocs=2, join=False,
                             start_method="spawn")  # fmt: skip
    try:
        while not ctx.join(timeout=120):
            pass
        return 0
    except mp.ProcessExitedException as e:
        return e.exit_code
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--crash-at", type=int, default=37)
    p.add_argument("--every", type=int, default=5)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = Path(tempfile.mkdtemp(prefix="memckpt-example-", dir=root))
    try:
        base = str(work / "mem")
        log.info("== phase 1: train, crash at step %d", args.crash_at)
        code = run("crash", base, args, str(work / "unused.pt"))
        log.info("processes died with exit code %s", code)
        log.info("== phase 2: restart and recover from memory")
        t0 = time.perf_counter()
        run("resume", base, args, str(work / "resumed.pt"))
        recovered_in = time.perf_counter() - t0
        log.info("== reference: the same run without a crash")
        shutil.rmtree(base, ignore_errors=True)
        run("plain", str(work / "ref"), args, str(work / "ref.pt"))
        a = torch.load(work / "resumed.pt", weights_only=True)
        b = torch.load(work / "ref.pt", weights_only=True)
        same = all(torch.equal(a[k], b[k]) for k in a)
        last_save = args.crash_at // args.every * args.every
        log.info(
            "crashed at step %d, resumed from step %d (lost %d steps), restart+finish %.1fs, "
            "final weights identical to the uninterrupted run: %s",
            args.crash_at, last_save, args.crash_at - last_save, recovered_in, same,
        )  # fmt: skip
        if not same:
            raise SystemExit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
