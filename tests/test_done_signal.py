"""The save-done signal async queues wait on: set by the engine, waited on in any process."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import torch

from memckpt import CheckpointManager
from memckpt.engine.done_signal import DoneSignal, new_signal, signal_when_done
from memckpt.errors import MemckptError
from memckpt.ids import JobLayout


def _wait_in_child(signal: DoneSignal, out: str) -> None:
    signal()
    Path(out).write_text("returned")


def test_a_forked_child_returns_once_the_save_has_ended(tmp_path: Path) -> None:
    # Given a manager and a signal for its next async save
    with CheckpointManager(tmp_path, "job") as mgr:
        layout = JobLayout(tmp_path, "job")
        signal = new_signal(layout, mgr.rank, 3, timeout_s=60)
        out = tmp_path / "child.out"
        # When a forked child (as NVRx's and Megatron's queues make) waits on it
        child = mp.get_context("fork").Process(target=_wait_in_child, args=(signal, str(out)))
        handle = mgr.engine.save(3, {"w": torch.ones(1000)}, blocking=False)
        seen: list[bool] = []
        signal_when_done(handle, signal, before=lambda h: seen.append(h.done()))
        child.start()
        child.join(30)
        # Then it returns after the save committed, and the hook ran before the signal
        assert child.exitcode == 0 and out.read_text() == "returned"
        assert handle.wait().step == 3 and seen == [True]
        assert signal.is_set()
        signal.clear()
        assert not signal.is_set()


def test_a_failing_hook_still_sets_the_signal(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, "job") as mgr:
        signal = new_signal(JobLayout(tmp_path, "job"), 0, 1, timeout_s=60)

        def hook(_: object) -> None:
            raise OSError("disk gone")

        handle = mgr.engine.save(1, {"w": torch.zeros(10)}, blocking=False)
        signal_when_done(handle, signal, before=hook)
        signal.wait()
        assert signal.is_set()


def test_the_wait_times_out_with_the_path_in_the_error(tmp_path: Path) -> None:
    signal = DoneSignal(tmp_path / "never", os.getpid(), timeout_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(MemckptError, match="never"):
        signal()
    assert time.monotonic() - t0 < 5


def test_a_waiter_whose_trainer_is_gone_returns_at_once(tmp_path: Path) -> None:
    t0 = time.monotonic()
    DoneSignal(tmp_path / "never", owner_pid=-1, timeout_s=60)()  # made by a process now gone
    assert time.monotonic() - t0 < 1


def test_signals_left_by_an_earlier_process_are_swept(tmp_path: Path) -> None:
    layout = JobLayout(tmp_path, "sweep-job")
    layout.signals_dir.mkdir(parents=True)
    stale = layout.signals_dir / "rank-0.step-5.1.2.done"
    other_rank = layout.signals_dir / "rank-1.step-5.1.2.done"
    stale.touch()
    other_rank.touch()
    signal = new_signal(layout, 0, 6, timeout_s=1)
    assert not stale.exists() and other_rank.exists()
    assert Path(signal.path).parent == layout.signals_dir and not signal.is_set()
