"""Every API recovers a killed job with a replaced node bit-identically to an uninterrupted run.

Per API (tests/campaign.py runs it, tests/campaign_workers.py holds the training bodies):
two simulated nodes of one rank each train with pairwise replication and a memory save
every few steps; the job is SIGKILLed at a seeded random step after a save committed;
one node's base directory is deleted; both ranks restart through the API's documented
restart path, resume from the newest step committed at the kill (its lost part read from
the peer), train to the end and match a reference run on every tensor, optimizer state
included. The printed plan names the seed; ``MEMCKPT_CAMPAIGN_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import pytest

import campaign_workers as workers
from campaign import Outcome, Plan, assert_resumed_bit_identical, run_campaign

pytestmark = pytest.mark.slow

STEPS, EVERY = 12, 3


def campaign(tmp_path, api: str, default_seed: int, fn, timeout: float = 45.0) -> Outcome:
    plan = Plan.draw(api, default_seed, steps=STEPS, every=EVERY)
    print(plan)
    out = run_campaign(tmp_path, plan, fn, timeout=timeout)
    assert_resumed_bit_identical(out)
    return out


def assert_only_the_wiped_rank_fetched(out: Outcome) -> None:
    """Per-rank objects: the wiped node's rank read its part from the peer, the other its own."""
    fetched = {r: o["fetched"] for r, o in out.restarted.items()}
    assert fetched == {r: r == out.plan.wiped_node for r in fetched}, fetched


def assert_the_wiped_node_got_the_manifest_back(out: Outcome) -> None:
    # DCP and Megatron read every rank's part on every rank; what shows that the replaced
    # node recovered from its peer is the step's manifest, which only the peer had left
    assert all(o["manifest_back"] for o in out.restarted.values()), out.restarted


@pytest.mark.timeout(150)
def test_checkpoint_manager_resumes_bit_identical_after_kill_and_node_loss(tmp_path):
    out = campaign(tmp_path, "CheckpointManager", 1101, workers.train_manager)
    assert_only_the_wiped_rank_fetched(out)


@pytest.mark.timeout(150)
def test_dcp_adapter_resumes_bit_identical_after_kill_and_node_loss(tmp_path):
    out = campaign(tmp_path, "dcp", 2202, workers.train_dcp)
    assert_the_wiped_node_got_the_manifest_back(out)


@pytest.mark.timeout(150)
def test_nvrx_local_manager_resumes_bit_identical_after_kill_and_node_loss(tmp_path):
    out = campaign(tmp_path, "nvrx", 3303, workers.train_nvrx)
    assert_only_the_wiped_rank_fetched(out)


@pytest.mark.timeout(150)
def test_state_resumes_bit_identical_after_kill_and_node_loss(tmp_path):
    out = campaign(tmp_path, "State", 4404, workers.train_state)
    # the extra state came back with the step, and the scheduler with the optimizer
    assert all(o["batches"] == STEPS for o in out.restarted.values()), out.restarted


@pytest.mark.timeout(180)
def test_lightning_resumes_bit_identical_after_kill_and_node_loss(tmp_path):
    pytest.importorskip("lightning.pytorch")
    out = campaign(tmp_path, "lightning", 5505, workers.train_lightning, timeout=60.0)
    assert {o["source"] for o in out.restarted.values()} == {"memory"}
    # the callbacks' state came back: the counter saw every batch of the whole run once
    assert all(o["batches"] == STEPS for o in out.restarted.values()), out.restarted
    assert_only_the_wiped_rank_fetched(out)


@pytest.mark.timeout(180)
def test_megatron_resumes_bit_identical_after_kill_and_node_loss(tmp_path):
    pytest.importorskip("megatron.core.dist_checkpointing")
    out = campaign(tmp_path, "megatron", 6606, workers.train_megatron, timeout=60.0)
    assert_the_wiped_node_got_the_manifest_back(out)
