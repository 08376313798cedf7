"""Every rank saves at the same step: votes are reduced with a max across ranks.

Ranks are simulated with threads and an injected reduction, then run for real as 2 and 4
gloo processes where only rank 1 receives a signal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from memckpt.schedule import IterManager, Trigger, local_all_reduce_max

START_UNIX = 1_767_225_600.0


class ThreadAllReduceMax:
    """An element-wise max across ``world`` threads, standing in for torch.distributed."""

    def __init__(self, world: int) -> None:
        self._barrier = threading.Barrier(world, action=self._reduce, timeout=10)
        self._inputs: dict[int, list[float]] = {}
        self._result: list[float] = []
        self.calls = 0

    def _reduce(self) -> None:
        self._result = [max(column) for column in zip(*self._inputs.values(), strict=True)]
        self._inputs.clear()
        self.calls += 1

    def for_rank(self, rank: int) -> Callable[[list[float]], list[float]]:
        def all_reduce_max(values: list[float]) -> list[float]:
            self._inputs[rank] = list(values)
            self._barrier.wait()
            result = list(self._result)
            self._barrier.wait()  # nobody overwrites the result before every rank read it
            return result

        return all_reduce_max


class FakeClock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _run_threads(world: int, rank_main: Callable[[int, Callable], list[int]]) -> list[list[int]]:
    reduce = ThreadAllReduceMax(world)
    results: list[list[int]] = [[] for _ in range(world)]
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = rank_main(rank, reduce.for_rank(rank))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors
    return results


def test_deadline_seen_by_one_rank_makes_every_rank_save_at_the_same_step():
    def rank_main(rank: int, all_reduce_max: Callable) -> list[int]:
        clock = FakeClock(START_UNIX)
        # Given only rank 2 knows a deadline 50 s away
        im = IterManager(
            deadline=START_UNIX + 50 if rank == 2 else None,
            redundant_time=5.0,
            signals=(),
            environ={},
            clock=clock,
            wall_clock=clock,
            all_reduce_max=all_reduce_max,
        )
        saved = []
        for step in range(1, 60):
            im.iter()
            clock.now += 1.0
            if im.should_save_ckpt():
                saved.append(step)
                assert im.last_decision.trigger is Trigger.DEADLINE
                assert im.exit_requested
        return saved

    # Then all ranks save at step 45 (5 s left < 0 + 1 + 5), once
    assert _run_threads(3, rank_main) == [[45], [45], [45]]


def test_ranks_with_different_speeds_still_save_at_the_same_steps():
    def rank_main(rank: int, all_reduce_max: Callable) -> list[int]:
        clock = FakeClock(1000.0)
        # Given a Young interval of sqrt(2 * C * 8 s): 4 s on rank 0 (C = 1), 8 s on rank 1 (C = 4)
        im = IterManager(
            mtbf_s=8.0,
            interval_formula="young",
            save_ckpt_time=1.0 if rank == 0 else 4.0,
            warmup_iters=0,
            signals=(),
            environ={},
            clock=clock,
            all_reduce_max=all_reduce_max,
        )
        saved = []
        for step in range(1, 14):
            im.iter()
            clock.now += 1.0
            if im.should_save_ckpt():
                saved.append(step)
        return saved

    # Then both follow the rank that wants to save most often
    assert _run_threads(2, rank_main) == [[4, 8, 12], [4, 8, 12]]


def test_one_reduction_per_decision_of_three_values():
    seen: list[list[float]] = []

    def spy(values: list[float]) -> list[float]:
        seen.append(list(values))
        return local_all_reduce_max(values)

    im = IterManager(save_interval=2, signals=(), environ={}, all_reduce_max=spy)
    for _ in range(4):
        im.iter()
        im.should_save_ckpt()
    assert seen == [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def test_without_process_group_or_reduction_decisions_stay_local():
    im = IterManager(save_interval=1, signals=(), environ={})
    im.iter()
    assert im.should_save_ckpt()


# ---- real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agreement_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        # The default reduction: torch.distributed is initialised, so it is used
        im = IterManager(signals=(signal.SIGUSR1,), signal_grace_s=0.0, environ={})
        saved, reasons = [], []
        for step in range(1, 11):
            im.iter()
            if rank == 1 and step == 6:
                os.kill(os.getpid(), signal.SIGUSR1)
            if im.should_save_ckpt():
                saved.append(step)
                reasons.append(im.explain())
        result = {"saved": saved, "reasons": reasons, "exit_requested": im.exit_requested}
        im.close()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, out_dir: Path) -> list[dict]:
    ctx = mp.start_processes(
        _agreement_worker,
        args=(world, _free_port(), str(out_dir)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 45
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, f"{world} ranks did not finish within 45 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.timeout(60)
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_signal_on_rank_1_makes_every_gloo_rank_save_at_the_same_step(world, tmp_path):
    # Given `world` gloo ranks where only rank 1 receives SIGUSR1, at step 6
    results = _spawn(world, tmp_path)

    # Then every rank saves at step 6, once, and is asked to exit
    assert [r["saved"] for r in results] == [[6]] * world
    assert all(r["exit_requested"] for r in results)
    assert results[1]["reasons"][0].startswith("signal SIGUSR1 received: ")
    others = [r["reasons"][0] for i, r in enumerate(results) if i != 1]
    assert others == ["signal SIGUSR1 received on another rank"] * (world - 1)
