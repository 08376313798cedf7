"""persist_every: committed steps drain to persistent storage in the background."""

from __future__ import annotations

import threading

import torch

import memckpt
from memckpt.engine import drain


def test_manager_drains_every_kth_step_to_a_loadable_tree(shm_dir):
    persist = shm_dir / "disk"
    with memckpt.CheckpointManager(shm_dir / "mem", "job", keep_last=1, persist_every=2,
                                   persist_dir=persist) as m:  # fmt: skip
        for step in range(1, 6):
            m.save(step, {"w": torch.full((1000,), float(step)), "step": step}).wait()
        drain.wait_for_drains(timeout=60)
    assert sorted(p.name for p in (persist / "job").glob("step-*")) == ["step-2", "step-4"]
    # the persistent tree is a memckpt tree with manifests: the manager loads it
    with memckpt.CheckpointManager(persist, "job", prefault=False) as disk:
        assert disk.latest() == 4
        assert disk.load()["step"] == 4


def test_retention_keeps_a_step_while_it_drains(shm_dir):
    gate = threading.Event()
    drain._executor.submit(gate.wait, 60)  # hold the drain thread
    try:
        with memckpt.CheckpointManager(shm_dir / "mem", "job", keep_last=1, persist_every=2,
                                       persist_dir=shm_dir / "disk") as m:  # fmt: skip
            for step in range(1, 5):
                m.save(step, {"w": torch.full((10,), float(step))}).wait()
            # step 2 waits to drain: retention (keep_last=1) must not have deleted it
            assert (shm_dir / "mem" / "job" / "step-2").exists()
            gate.set()
            drain.wait_for_drains(timeout=60)
            m.save(5, {"w": torch.zeros(10)}).wait()
            assert not (shm_dir / "mem" / "job" / "step-2").exists()
    finally:
        gate.set()
