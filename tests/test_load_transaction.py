"""The load transaction's pure decisions and its rules, without processes.

Given / When / Then: the decision after a vote, where lost copies go, the tier rule, and
damage remembered in the job's tree across restarts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import memckpt
from memckpt.engine import (
    RankOutcome,
    choose_tier,
    decide_after_vote,
    plan_recovery,
    resume_tiers,
)
from memckpt.replication.replicator import plan_copies
from memckpt.storage.inventory import ManifestInfo, StepHoldings
from reshard_workers import flip_first_tensor_byte

OK = RankOutcome(True)


def _damaged(kind: str = "DataDamagedError", touched: bool = False) -> RankOutcome:
    return RankOutcome(False, kind, "checksum mismatch", touched)


# -- decide_after_vote ------------------------------------------------------------------


def test_every_rank_ok_is_done():
    assert decide_after_vote([OK, OK], explicit_step=False).action == "done"


@pytest.mark.parametrize(
    "kind", ["DataDamagedError", "CorruptCheckpointError", "TransferError", "StateModifiedError"]
)
def test_damaged_or_unreachable_data_falls_back_when_no_step_was_named(kind):
    d = decide_after_vote([OK, _damaged(kind)], explicit_step=False)
    assert d.action == "fallback" and d.failed == ((1, kind, "checksum mismatch"),)


def test_a_named_step_is_never_replaced_by_another():
    assert decide_after_vote([_damaged(), OK], explicit_step=True).action == "raise"


@pytest.mark.parametrize("kind", ["StateDictMismatchError", "UnsupportedValueError"])
def test_failures_an_older_step_cannot_cure_are_raised(kind):
    d = decide_after_vote([_damaged(), _damaged(kind)], explicit_step=False)
    assert d.action == "raise"


def test_touched_state_on_any_rank_is_reported_to_every_rank():
    d = decide_after_vote([OK, _damaged(touched=True)], explicit_step=False)
    assert d.any_touched


# -- plan_copies ------------------------------------------------------------------------


def test_copies_lost_with_a_node_come_back_and_own_objects_are_fetched_not_pushed():
    # 2 ranks, one per node; node 0 was replaced: node 1 holds both objects
    moves = plan_copies({0: [1], 1: [1]}, node_of=[0, 1], copies=2)
    assert moves == {0: [("fetch", 0, 1)], 1: [("push", 1, 0)]}


def test_a_step_saved_by_4_ranks_goes_back_to_the_node_that_lost_it():
    # 3 ranks now (node 0: ranks 0, 1; node 1: rank 2); only node 0 holds the 4 objects
    moves = plan_copies({r: [0, 1] for r in range(4)}, node_of=[0, 0, 1], copies=2)
    assert moves == {0: [("push", 0, 2), ("push", 1, 2), ("push", 3, 2)], 2: [("fetch", 2, 0)]}


def test_nothing_moves_when_every_object_has_its_copies_or_there_is_one_node():
    assert plan_copies({0: [0, 1], 1: [0, 1]}, node_of=[0, 1], copies=2) == {}
    assert plan_copies({0: [0], 1: [0]}, node_of=[0, 0], copies=2) == {}


# -- the tier rule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "persistent", "exists", "tier"),
    [
        (None, None, False, "none"),
        (4, None, False, "memory"),
        (6, 6, True, "memory"),  # a tie goes to memory
        (4, 6, True, "persistent"),
        (8, 6, True, "memory"),
        (8, None, True, "persistent"),  # a persistent checkpoint whose step is unknown
    ],
)
def test_choose_tier(memory, persistent, exists, tier):
    assert choose_tier(memory, persistent, exists) == tier


def test_resume_tries_memory_at_or_above_the_persistent_step_then_persistent():
    floors = []

    def none_loaded(floor):
        floors.append(floor)
        return None  # every memory step >= floor was damaged

    choice = resume_tiers(none_loaded, persistent_step=6, persistent_exists=True)
    assert floors == [6] and (choice.tier, choice.step) == ("persistent", 6)
    choice = resume_tiers(lambda floor: 6, persistent_step=6, persistent_exists=True)
    assert (choice.tier, choice.step, choice.memory_step) == ("memory", 6, 6)


def test_resume_with_an_unknown_persistent_step_does_not_load_memory():
    def never(floor):
        raise AssertionError("memory must not be loaded")

    assert resume_tiers(never, None, persistent_exists=True).tier == "persistent"


# -- damage marks -----------------------------------------------------------------------


def test_plan_passes_over_a_step_marked_damaged_on_any_node():
    m = ManifestInfo(1, (7,), checksum=42)
    invs = [
        {2: StepHoldings({0: 7}, m, damaged=frozenset({42})), 1: StepHoldings({0: 5}, m)},
        {2: StepHoldings({}, None)},
    ]
    m1 = ManifestInfo(1, (5,), checksum=41)
    invs[0][1] = StepHoldings({0: 5}, m1)
    plan = plan_recovery(invs, 1, allow_fetch=True)
    assert plan.step == 1 and plan.skipped[2].startswith("damaged")


def _save(base: Path, steps: list[int]) -> None:
    with memckpt.CheckpointManager(base, "job", keep_last=5, prefault=False) as m:
        for s in steps:
            m.save(s, {"w": torch.full((4096,), float(s)), "step": s}, blocking=True)


def test_damage_found_by_a_load_is_remembered_across_restarts_until_a_resave(tmp_path):
    _save(tmp_path, [1, 2, 3])
    obj = tmp_path / "job" / "step-3" / "rank-0.mck"
    flip_first_tensor_byte(obj)
    with memckpt.CheckpointManager(tmp_path, "job", keep_last=5, prefault=False) as m:
        assert m.latest() == 3  # headers and manifests look fine
        out = m.load()
        assert out["step"] == 2 and m.last_load.fell_back_from == (3,)
        # the damaged copy is set aside, and the step is marked
        assert not obj.exists() and obj.with_name("rank-0.mck.damaged").exists()
        assert list((tmp_path / "job" / "step-3").glob("damaged.*"))
    with memckpt.CheckpointManager(tmp_path, "job", keep_last=5, prefault=False) as m:
        assert m.latest() == 2  # a restart agrees without reading any data
        assert m.load(newer_than=2) is None
        with pytest.raises(memckpt.CheckpointNotFoundError, match="damaged"):
            m.load(step=3)
        m.save(3, {"w": torch.full((4096,), 3.0), "step": 3}, blocking=True)  # a re-save
        assert m.latest() == 3 and m.load()["step"] == 3


# -- CheckpointManager with a drained tier ------------------------------------------------


def _mgr(base: Path, persist: Path, **kw) -> memckpt.CheckpointManager:
    return memckpt.CheckpointManager(base, "job", keep_last=2, prefault=False, persist_every=2,
                                     persist_dir=persist, **kw)  # fmt: skip


def test_a_normal_end_with_the_newest_step_drained_gives_the_memory_back(tmp_path):
    base, persist = tmp_path / "shm", tmp_path / "disk"
    with _mgr(base, persist) as m:
        for s in (1, 2):
            m.save(s, {"w": torch.full((64,), float(s))}, blocking=True)
    assert not (base / "job").exists()  # released at the normal end, step 2 is on disk
    # a restart with nothing in memory resumes from the drained tier
    with _mgr(base, persist) as m:
        out = m.load()
        assert m.last_load.tier == "persistent" and m.last_load.step == 2
        assert torch.equal(out["w"], torch.full((64,), 2.0))
        m.save(3, {"w": torch.full((64,), 3.0)}, blocking=True)
    assert (base / "job" / "step-3").exists()  # step 3 is not drained: memory stays


def test_memory_wins_a_tie_and_newer_memory_wins_over_the_drained_step(tmp_path):
    base, persist = tmp_path / "shm", tmp_path / "disk"
    m = _mgr(base, persist)
    for s in (2, 3):
        m.save(s, {"w": torch.full((64,), float(s))}, blocking=True)
    m.close(release_memory=False)
    with _mgr(base, persist) as m:
        assert m.load()["w"][0] == 3.0 and m.last_load.tier == "memory"
    flip_first_tensor_byte(base / "job" / "step-3" / "rank-0.mck")  # newest memory step damaged
    with _mgr(base, persist) as m:  # memory step 2 ties the drained step 2: memory
        assert m.load()["w"][0] == 2.0 and m.last_load.tier == "memory"
        assert m.last_load.step == 2


def test_leaving_with_an_exception_keeps_the_memory_tier(tmp_path):
    base, persist = tmp_path / "shm", tmp_path / "disk"
    with pytest.raises(KeyError), _mgr(base, persist) as m:
        m.save(2, {"w": torch.ones(4)}, blocking=True)
        raise KeyError("training failed")
    assert (base / "job" / "step-2").exists()
