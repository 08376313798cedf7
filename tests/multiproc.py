"""Run a function on N gloo ranks in spawned processes, with a timeout and cleanup."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    env: dict[str, str],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        results.put((rank, True, out))
    except BaseException as e:
        results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    env_per_rank: dict[int, dict[str, str]] | None = None,
    expect_dead: tuple[int, ...] = (),
) -> dict[int, Any]:
    """Run ``fn(rank, world_size, *args)`` on every rank; return {rank: result}.

    Raises AssertionError if a rank fails or the run passes ``timeout``; ranks in
    ``expect_dead`` may die without reporting. Every process is killed on the way out.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = []
    try:
        for r in range(world_size):
            e = dict(env or {})
            e.update((env_per_rank or {}).get(r, {}))
            p = ctx.Process(target=_rank_main, args=(fn, r, world_size, port, e, args, results))
            p.start()
            procs.append(p)
        out: dict[int, Any] = {}
        errors: list[str] = []
        waiting = set(range(world_size)) - set(expect_dead)
        import time

        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"ranks {sorted(waiting)} did not finish in {timeout}s")
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r in waiting if not procs[r].is_alive() and procs[r].exitcode != 0]
                if dead:
                    raise AssertionError(
                        f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]})"
                    ) from None
                continue
            waiting.discard(rank)
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}: {value}")
        if errors:
            raise AssertionError("\n".join(errors))
        for p in procs:
            p.join(timeout=10)
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        results.close()
