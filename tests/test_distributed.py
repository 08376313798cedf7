from __future__ import annotations

import pytest

import dist_workers as w
from multiproc import run_ranks


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("world", "per_node"), [(2, 2), (2, 1), (4, 2)])
def test_zoo_round_trips_on_gloo_ranks(shm_dir, world, per_node):
    # Given `world` ranks, `per_node` of them sharing a node directory
    out = run_ranks(w.zoo_round_trip, world, str(shm_dir), per_node, timeout=100)
    # Then every rank agrees on the newest step and retention kept keep_last=2 steps
    assert {o["latest"] for o in out.values()} == {3}
    assert all(o["steps"] == ["step-2", "step-3"] for o in out.values())


@pytest.mark.timeout(90)
def test_one_rank_out_of_space_skips_the_step_on_every_rank(shm_dir):
    out = run_ranks(w.one_rank_runs_out_of_space, 2, str(shm_dir), timeout=80)
    # a skipped save is a result on every rank, naming the rank that had no room
    for o in out.values():
        assert o["error"] is None and "rank 1" in o["skipped"] and "limit_bytes" in o["skipped"]
    for o in out.values():
        assert o["latest"] == 1 and o["loaded_previous"]


@pytest.mark.timeout(120)
def test_rank_killed_mid_save_gives_peers_a_bounded_error_and_previous_step_recovers(shm_dir):
    # Given rank 1 dies (SIGKILL) after staging step 2, before publishing it
    fault = {1: {"MEMCKPT_FAULT_POINT": "before_local_commit", "MEMCKPT_FAULT_STEP": "2"}}
    out = run_ranks(w.save_then_die, 2, str(shm_dir), env_per_rank=fault, expect_dead=(1,),
                    timeout=80)  # fmt: skip
    # Then rank 0's save fails within the collective timeout, naming the vote
    assert "CollectiveError" in out[0]["error"] and "commit vote for step 2" in out[0]["error"]
    assert out[0]["waited"] < 40
    # When the job restarts, every rank recovers step 1
    out = run_ranks(w.recover_after_death, 2, str(shm_dir), timeout=80)
    assert out == {r: {"latest": 1, "t0": 1.0, "r": r} for r in (0, 1)}
