"""close() waits for re-replication in flight: a replaced node does not close on its peers.

After a node is replaced, the first load re-replicates in the background: rank 0 pushes
its object to the new node's rank 1. A rank 1 that closed right after load used to shut
its server first, and rank 0's push failed (PeerClosedError, or refused).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from multiproc import run_ranks
from replication_workers import manager, save_steps, state

pytestmark = pytest.mark.slow


def _load_then_close_at_once(rank: int, world: int, base: str) -> dict:
    with manager(rank, base, 1, "pairwise") as m:
        if rank == 0:  # a push that starts late, as on a loaded machine
            real_put = m.replicator.client.put

            def late_put(*args, **kwargs):
                time.sleep(1.0)
                return real_put(*args, **kwargs)

            m.replicator.client.put = late_put
        dest = state(rank, 0)
        assert m.load(state_dict=dest) is not None
        assert torch.equal(dest["model"]["w"], state(rank, 1)["model"]["w"])
        t0 = time.monotonic()
    # no wait(), no barrier: every rank closes as soon as its own load is done
    return {"close_s": time.monotonic() - t0}


@pytest.mark.timeout(180)
def test_close_right_after_load_waits_for_the_copies_peers_re_replicate_to_this_node(shm_dir):
    # Given a 2-node pairwise job that saved step 1, and node 1 replaced (its memory wiped)
    first = run_ranks(save_steps, 2, str(shm_dir), 1, "pairwise", [1], timeout=90)
    assert all(r["results"][1][0] for r in first.values()), first
    shutil.rmtree(shm_dir / "node1")
    # When both ranks load and close at once, rank 0's re-replication push starting late
    out = run_ranks(_load_then_close_at_once, 2, str(shm_dir), timeout=90)
    # Then node 1 again holds rank 0's copy: rank 1's close waited for it (bounded)
    step1 = Path(shm_dir) / "node1" / "job" / "step-1"
    assert sorted(p.name for p in step1.glob("rank-*.mck")) == ["rank-0.mck", "rank-1.mck"]
    assert out[1]["close_s"] < 10, out  # the transfer timeout of these managers is 5 s
