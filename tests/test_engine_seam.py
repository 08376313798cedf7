"""The seam framework APIs drive: manifest, save transaction with an injected vote, object
sources and locator, retention as a pure policy, one node runtime per process and job."""

from __future__ import annotations

import pytest
import torch

import memckpt
from memckpt.engine.save_transaction import Ballot, SaveTransaction, single_rank_vote
from memckpt.engine.sources import ObjectLocator
from memckpt.errors import CommitError, CorruptCheckpointError, MemckptError
from memckpt.storage.inventory import StepHoldings
from memckpt.storage.manifest import (
    ObjectDigest,
    decode_manifest,
    encode_manifest,
    new_manifest,
)
from memckpt.storage.retention import plan_retention
from memckpt.storage.statedict import flatten_state_dict
from memckpt.storage.store import CheckpointStore
from memckpt.storage.writer import plan_layout

# -- manifest -------------------------------------------------------------------------------


def test_manifest_round_trips_with_blobs_and_rejects_any_flipped_byte():
    m = new_manifest("job", 7, 2, {0: ObjectDigest(10, 1), 1: ObjectDigest(20, 2)},
                     {".metadata": b"\x00\x01dcp", "common.pt": b"x" * 100})  # fmt: skip
    raw = encode_manifest(m)
    back = decode_manifest(raw, "m")
    assert back == m and back.checksum == m.checksum and back.nbytes == 30
    for i in range(0, len(raw), 7):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        with pytest.raises(CorruptCheckpointError, match="manifest"):
            decode_manifest(bytes(bad), "m")


def test_manifest_must_name_every_rank_of_its_world():
    with pytest.raises(ValueError, match=r"expected 0\.\.2"):
        new_manifest("job", 1, 3, {0: ObjectDigest(1, 1), 2: ObjectDigest(1, 1)})


# -- save transaction and the injected vote --------------------------------------------------


def _stage(store: CheckpointStore, step: int, value: float) -> SaveTransaction:
    flat = flatten_state_dict({"w": torch.full((16,), value)})
    txn = SaveTransaction(store, step)
    txn.stage(flat, plan_layout(flat, None), hash_inline=False, chunk_size=1 << 20)
    txn.finalize(world_size=1)
    txn.commit_local()
    return txn


def test_transaction_writes_a_manifest_from_the_ballots_the_vote_returns(shm_dir):
    store = CheckpointStore(shm_dir, "job", 0)
    seen = []

    def framework_vote(step, ballot):  # e.g. DCP's finish, handed every rank's result
        seen.append((step, ballot.ok))
        return [ballot]

    txn = _stage(store, 4, 1.5)
    manifest, replicated = txn.complete(framework_vote, {".metadata": b"plan"})
    assert seen == [(4, True)]
    assert manifest.world_size == 1 and manifest.blobs == {".metadata": b"plan"}
    assert store.manifest(4) == manifest and store.committed_steps() == [4]
    assert not replicated
    store.close()


def test_failed_vote_rolls_back_and_names_the_failed_rank(shm_dir):
    store = CheckpointStore(shm_dir, "job", 0)
    txn = _stage(store, 4, 1.5)

    def vote(step, ballot):
        return [ballot, Ballot(1, False, "InsufficientSpaceError: tmpfs full")]

    with pytest.raises(CommitError, match="rank 1: InsufficientSpaceError: tmpfs full"):
        txn.complete(vote)
    assert store.steps() == [] and store.manifest(4) is None
    store.close()


def test_engine_takes_an_injected_vote_and_named_blobs(shm_dir):
    calls = []

    def vote(step, ballot):
        calls.append(step)
        return single_rank_vote(step, ballot)

    with memckpt.CheckpointManager(shm_dir, "job", vote=vote) as m:
        m.engine.save(3, None, flat=flatten_state_dict({"a": torch.ones(3)}),
                      blobs={"meta": b"{}"}).wait()  # fmt: skip
        assert calls == [3]
        assert m.store.manifest(3).blobs == {"meta": b"{}"}
        assert torch.equal(m.load()["a"], torch.ones(3))


# -- object sources and the locator ----------------------------------------------------------


def test_locator_reads_the_local_copy_and_refuses_one_the_manifest_does_not_name(shm_dir):
    store = CheckpointStore(shm_dir, "job", 0)
    txn = _stage(store, 2, 3.0)
    manifest, _ = txn.complete(single_rank_vote)
    inv = [store.inventory()]
    loc = ObjectLocator(store, None, inv, 2, {0: manifest.objects[0].digest})
    assert loc.is_local(0) and loc.holders(0) == []
    out, holder = loc.read(0, lambda src: memckpt.load_object(src))
    assert holder is None and torch.equal(out["w"], torch.full((16,), 3.0))
    wrong = ObjectLocator(store, None, inv, 2, {0: manifest.objects[0].digest + 1})
    assert not wrong.is_local(0)
    with pytest.raises(memckpt.CheckpointNotFoundError, match="no live node holds rank 0"):
        wrong.read(0, lambda src: None)
    store.close()


def test_locator_lists_holders_by_digest_and_puts_the_planned_one_first():
    class FakeStore:
        rank = 0

    invs = [
        {5: StepHoldings({0: 11})},
        {5: StepHoldings({0: 11})},
        {5: StepHoldings({0: 99})},  # another save's object: not this step's data
        {5: StepHoldings({0: 11})},
    ]

    class FakeNetwork:
        def __init__(self, node_of: list[int]) -> None:
            self.topology = type("Topology", (), {"node_of": node_of})()

    one_per_node = FakeNetwork([0, 1, 2, 3])
    loc = ObjectLocator(FakeStore(), one_per_node, invs, 5, {0: 11})  # type: ignore[arg-type]
    assert loc.holders(0) == [1, 3]
    assert loc.holders(0, first=3) == [3, 1]
    # ranks 0 and 1 share a node (one tree: rank 1's copy is rank 0's own), 2 and 3 another
    two_nodes = FakeNetwork([0, 0, 1, 1])
    loc = ObjectLocator(FakeStore(), two_nodes, invs, 5, {0: 11})  # type: ignore[arg-type]
    assert loc.holders(0) == [3]
    # no transfer service: every rank is on this node, no other holder
    loc = ObjectLocator(FakeStore(), None, invs, 5, {0: 11})  # type: ignore[arg-type]
    assert loc.holders(0) == []


# -- retention as a pure policy --------------------------------------------------------------


def test_retention_keeps_the_newest_committed_and_the_newest_replicated():
    plan = plan_retention([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], keep_last=2, newest=5, replicated=3)
    assert plan.keep == {3, 4, 5} and plan.delete == (1, 2)


def test_retention_never_deletes_before_a_newer_commit_nor_newer_in_flight_steps():
    # 6 is being saved by a faster peer; nothing committed after 4
    plan = plan_retention([3, 4, 6], [3, 4], keep_last=1, newest=4)
    assert plan.delete == (3,) and 4 in plan.keep
    # an abandoned timeline (restart from 4) goes
    assert plan_retention([3, 4, 6], [3, 4], keep_last=1, newest=4, abandoned=[6]).delete == (3, 6)
    # a draining step stays
    assert plan_retention([3, 4], [3, 4], keep_last=1, newest=4, draining=[3]).delete == ()
    # nothing committed: nothing deleted
    assert plan_retention([1, 2], [], keep_last=1).delete == ()


# -- one node runtime per process and job ----------------------------------------------------


def test_second_manager_of_a_job_shares_the_runtime(shm_dir):
    with (
        memckpt.CheckpointManager(shm_dir, "job") as a,
        memckpt.CheckpointManager(shm_dir, "job") as b,
    ):
        assert a.runtime is b.runtime and a.store is b.store and a.engine is b.engine
        a.save(1, {"x": torch.ones(2)}).wait()
        assert b.latest() == 1
    # the last close closed it; a new manager opens a fresh one
    with memckpt.CheckpointManager(shm_dir, "job") as c:
        assert c.latest() == 1


def test_second_manager_with_other_settings_is_refused_naming_both(shm_dir):
    with (
        memckpt.CheckpointManager(shm_dir, "job", keep_last=2),
        pytest.raises(MemckptError, match="already open in this process"),
    ):
        memckpt.CheckpointManager(shm_dir, "job", keep_last=3)


def test_restart_prefaults_a_buffer_the_size_of_the_newest_object(shm_dir):
    with memckpt.CheckpointManager(shm_dir, "job") as m:
        m.save(1, {"x": torch.ones(1 << 20)}).wait()
    with memckpt.CheckpointManager(shm_dir, "job") as m:
        m.store.pool.wait_prefault(30)
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not m.store.pool._free:
            time.sleep(0.05)
        need = m.store.object_path(1, 0).stat().st_size
        assert any(b.capacity >= need for b in m.store.pool._free)
