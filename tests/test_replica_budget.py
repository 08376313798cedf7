"""Replicas still arriving count against limit_bytes, and unfinished transfers are capped."""

from __future__ import annotations

import torch

import memckpt
from memckpt.storage.store import CheckpointStore


def test_buffers_handed_out_count_against_the_limit(shm_dir):
    store = CheckpointStore(shm_dir, "job", 1, limit_bytes=16 << 20)
    try:
        held = [store.pool.acquire_sparse(4 << 20) for _ in range(4)]  # 16 MiB in flight
        assert store.pool.owned_bytes() == 16 << 20
        try:
            store.pool.acquire_sparse(4 << 20)
            raise AssertionError("the fifth replica should not fit")
        except memckpt.InsufficientSpaceError as e:
            assert "limit" in str(e)
        for buf in held:
            store.pool.discard(buf)
        assert store.pool.owned_bytes() == 0
        assert not list(store.pool.dir.glob("*.buf"))
        store.pool.give_back(store.pool.acquire(1 << 20))
    finally:
        store.close()


def test_save_buffer_in_flight_counts_too(shm_dir):
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=1, limit_bytes=64 << 20) as m:
        m.save(1, {"t": torch.ones(1 << 20)}).wait()
        assert m.store.pool.owned_bytes() <= 64 << 20
