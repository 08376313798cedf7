"""Spawned gloo worlds for the multi-rank benchmarks: start, collect rank 0's result, clean up."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["free_port", "run_world"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_entry(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    port: int,
    args: tuple[Any, ...],
    q: Any,
    cleanup: Callable[[], Any] | None,
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        q.put((rank, True, fn(rank, world, *args)))
    except BaseException:
        q.put((rank, False, traceback.format_exc()))
    finally:
        if cleanup is not None:
            cleanup()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 1800,
              cleanup: Callable[[], Any] | None = None) -> Any:  # fmt: skip
    """Run ``fn(rank, world, *args)`` on ``world`` spawned gloo ranks; rank 0's result.

    ``cleanup()`` runs in each rank before its process group is destroyed.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_entry, args=(fn, r, world, port, args, q, cleanup))
             for r in range(world)]  # fmt: skip
    try:
        for p in procs:
            p.start()
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(out) < world:
            if time.monotonic() > deadline:
                raise SystemExit(f"{fn.__name__} on {world} ranks passed {timeout}s")
            try:
                rank, ok, value = q.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode]
                if dead:
                    raise SystemExit(f"{fn.__name__}: ranks {dead} died") from None
                continue
            if not ok:
                raise SystemExit(f"{fn.__name__} failed on rank {rank}:\n{value}")
            out[rank] = value
        for p in procs:
            p.join(timeout=60)
        return out[0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
