from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import memckpt
from crash_worker import state_for
from memckpt.storage.faults import FAULT_POINTS
from zoo import assert_same

WORKER = str(Path(__file__).with_name("crash_worker.py"))
BEFORE_LOCAL_COMMIT = {"after_begin", "mid_stage", "after_stage", "before_header",
                       "before_local_commit"}  # fmt: skip


def _run_worker(base: Path, first: int, last: int, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, WORKER, str(base), str(first), str(last)],
        env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip


def _assert_recoverable(base: Path, allowed: set[int]) -> int:
    with memckpt.CheckpointManager(base, "job", keep_last=1) as m:
        step = m.latest()
        assert step in allowed, f"latest() is {step}, expected one of {allowed}"
        assert_same(m.load(), state_for(step))
        # and the tree is still usable for new saves
        m.save(step + 100, state_for(step + 100)).wait()
        assert m.latest() == step + 100
    return step


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", FAULT_POINTS)
def test_kill_at_each_point_of_a_save_keeps_a_complete_checkpoint(shm_dir, point):
    # Given a complete step 1, a process killed at `point` while saving step 2
    proc = _run_worker(shm_dir, 1, 2, {"MEMCKPT_FAULT_POINT": point, "MEMCKPT_FAULT_STEP": "2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["1"]
    # Then a restart finds step 1, or step 2 once its object was published on every rank
    allowed = {1} if point in BEFORE_LOCAL_COMMIT else {2} if point == "mid_retention" else {1, 2}
    _assert_recoverable(shm_dir, allowed)


@pytest.mark.timeout(120)
def test_kill_at_random_instants_never_exposes_a_partial_step(shm_dir):
    rng = random.Random(1234)
    for trial in range(4):
        # Given a process saving steps continuously
        proc = subprocess.Popen(
            [sys.executable, WORKER, str(shm_dir), str(trial * 1000), str(trial * 1000 + 10_000)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            first = proc.stdout.readline()  # at least one complete save
            assert first.strip() == str(trial * 1000)
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.kill()
            proc.wait(timeout=30)
            proc.stdout.close()
        # Then whatever instant it died at, the newest complete step loads bit-exactly
        step = _assert_recoverable(shm_dir, set(range(0, trial * 1000 + 10_101)))
        assert step >= trial * 1000
