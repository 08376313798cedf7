from __future__ import annotations

import os

import pytest
import torch

import memckpt


def _objects(job):
    return sorted(p.parent.name for p in job.glob("step-*/rank-0.mck"))


def test_retention_keeps_newest_keep_last_complete_steps(shm_dir):
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=2) as m:
        for s in range(5):
            m.save(s, {"t": torch.full((100,), s)}).wait()
        assert _objects(shm_dir / "job") == ["step-3", "step-4"]
        assert m.latest() == 4


def test_buffers_are_reused_not_reallocated(shm_dir):
    # Given keep_last=1, steady state needs two buffers: the kept step and the next save
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=1) as m:
        inodes = set()
        for s in range(6):
            res = m.save(s, {"t": torch.randn(1 << 18)}).wait()
            inodes.add(os.stat(res.path).st_ino)
        # Then the same files cycle between the pool and the step directories
        assert len(inodes) <= 3
        assert len(list((shm_dir / "job" / ".pool").iterdir())) <= 2


def test_restart_from_older_step_drops_the_abandoned_newer_steps(shm_dir):
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=3) as m:
        for s in (10, 20, 30):
            m.save(s, {"s": torch.tensor(s)}).wait()
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=3) as m:
        assert m.load(step=10)["s"].item() == 10
        m.save(15, {"s": torch.tensor(15)}).wait()
        # 20 and 30 belong to the timeline the job abandoned
        assert m.latest() == 15
        assert _objects(shm_dir / "job") == ["step-10", "step-15"]


def test_saving_an_existing_step_replaces_it(shm_dir):
    with memckpt.CheckpointManager(shm_dir, "job") as m:
        m.save(1, {"v": torch.tensor(1)}).wait()
        m.save(1, {"v": torch.tensor(2)}).wait()
        assert m.load()["v"].item() == 2


def test_size_limit_skips_the_save_cleanly_and_keeps_the_previous(shm_dir):
    limit = 24 << 20
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=1, limit_bytes=limit) as m:
        m.save(1, {"t": torch.ones(1 << 20)}).wait()  # 4 MiB
        # When a save needs more than the limit allows
        handle = m.save(2, {"t": torch.ones(8 << 20)})  # 32 MiB
        # Then the save is skipped: its result names the limit, nothing raises
        result = handle.wait()
        assert not result.committed and "limit_bytes" in result.skipped
        with pytest.raises(memckpt.InsufficientSpaceError, match="limit_bytes"):
            result.raise_if_skipped()  # for callers that want an exception
        # and the previous checkpoint stays loadable, training can go on
        assert m.latest() == 1
        assert torch.equal(m.load()["t"], torch.ones(1 << 20))
        m.save(3, {"t": torch.zeros(1 << 20)}).wait()
        assert m.latest() == 3


def test_delete_job_removes_the_nodes_whole_tree(tmp_path) -> None:
    import torch

    from memckpt import CheckpointManager
    from memckpt.ids import JobLayout
    from memckpt.storage.store import delete_job

    with CheckpointManager(tmp_path, "gone") as mgr:
        mgr.save(1, {"w": torch.ones(10)}, blocking=True)
    layout = JobLayout(tmp_path, "gone")
    assert layout.manifest_path(1).exists()
    delete_job(layout)
    assert not layout.root.exists()
    delete_job(layout)  # nothing left: a no-op
