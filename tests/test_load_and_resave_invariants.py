"""Invariants of loads and re-saves: world size, damaged loads into caller tensors, re-saves
killed or voted down, and ls/gc/status agreeing with recovery."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memckpt
from crash_worker import state_for
from memckpt.storage.faults import FAULT_POINTS
from memckpt.tools.cli import main as cli_main
from multiproc import run_ranks
from zoo import assert_same

WORKER = str(Path(__file__).with_name("crash_worker.py"))


# -- 1. a checkpoint is complete only against the world size that saved it ------------------


def _save_then_load_other_world(rank: int, world_size: int, base: str, phase: str) -> object:
    if phase == "save":
        with memckpt.CheckpointManager(base, "job", timeout_s=30) as m:
            m.save(5, {"shard": torch.full((4,), float(rank))}).wait()
        return None
    with memckpt.CheckpointManager(base, "job", timeout_s=30) as m:
        out = {}
        for name, call in (("latest", m.latest), ("load", lambda: m.load(state_dict={}))):
            try:
                call()
                out[name] = "no error"
            except memckpt.WorldSizeMismatchError as e:
                out[name] = str(e)
        out["skip"] = m.latest(on_world_size_mismatch="skip")
        return out


@pytest.mark.timeout(120)
def test_four_rank_checkpoint_does_not_load_silently_into_two_ranks(shm_dir):
    # Given step 5 saved by 4 ranks on one node
    run_ranks(_save_then_load_other_world, 4, str(shm_dir), "save", timeout=90)
    # When 2 ranks look for it
    out = run_ranks(_save_then_load_other_world, 2, str(shm_dir), "load", timeout=90)
    # Then latest() and load() both refuse, naming both sizes and the resharding path
    for rank in (0, 1):
        for call in ("latest", "load"):
            msg = out[rank][call]
            assert "saved by 4 ranks" in msg and "runs 2" in msg and "reshard" in msg, msg
        # and skipping such steps finds nothing older
        assert out[rank]["skip"] is None


def test_world_size_rule_is_in_the_pure_plan():
    from memckpt.engine.recovery_plan import plan_recovery
    from memckpt.storage.inventory import ManifestInfo, StepHoldings

    m4 = ManifestInfo(4, (1, 2, 3, 4), checksum=9)
    m2 = ManifestInfo(2, (5, 6), checksum=8)
    node = {
        7: StepHoldings({0: 1, 1: 2, 2: 3, 3: 4}, m4),
        3: StepHoldings({0: 5, 1: 6}, m2),
    }
    plan = plan_recovery([node, node], 2)
    assert plan.step is None and plan.world_size_mismatch == (7, 4)
    plan = plan_recovery([node, node], 2, on_world_size_mismatch="skip")
    assert plan.step == 3 and "saved by 4 ranks" in plan.skipped[7]


# -- 2. a load that wrote damaged bytes never returns None -----------------------------------


def _flip_byte_of_value(path: Path, value: float) -> None:
    raw = bytearray(path.read_bytes())
    needle = struct.pack("<f", value)
    at = raw.index(needle)
    raw[at + 3] ^= 0x40
    path.write_bytes(bytes(raw))


def test_damaged_load_into_caller_tensors_raises_instead_of_returning_none(shm_dir):
    with memckpt.CheckpointManager(shm_dir, "job") as m:
        m.save(1, {"w": torch.tensor([1.0, 2.0, 3.0])}).wait()
    _flip_byte_of_value(shm_dir / "job" / "step-1" / "rank-0.mck", 1.0)
    dest = {"w": torch.zeros(3)}
    with (
        memckpt.CheckpointManager(shm_dir, "job") as m,
        pytest.raises(memckpt.StateModifiedError, match="partly loaded"),
    ):
        m.load(state_dict=dest)
    # the tensor was touched, and the error said so rather than returning None
    assert not torch.equal(dest["w"], torch.zeros(3))


def test_damaged_load_falls_back_to_an_older_step_that_rewrites_every_tensor(shm_dir):
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=2) as m:
        m.save(1, {"w": torch.tensor([7.0, 8.0, 9.0])}).wait()
        m.save(2, {"w": torch.tensor([1.0, 2.0, 3.0])}).wait()
    _flip_byte_of_value(shm_dir / "job" / "step-2" / "rank-0.mck", 1.0)
    dest = {"w": torch.zeros(3)}
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=2) as m:
        out = m.load(state_dict=dest)
        assert m.last_load.step == 1 and m.last_load.fell_back_from == (2,)
    assert out is dest and torch.equal(dest["w"], torch.tensor([7.0, 8.0, 9.0]))


def test_damaged_load_without_a_state_dict_still_returns_none_when_nothing_else(shm_dir):
    with memckpt.CheckpointManager(shm_dir, "job") as m:
        m.save(1, {"w": torch.tensor([1.0, 2.0, 3.0])}).wait()
    _flip_byte_of_value(shm_dir / "job" / "step-1" / "rank-0.mck", 1.0)
    with memckpt.CheckpointManager(shm_dir, "job") as m:
        assert m.load() is None  # nothing of the caller's was touched


# -- 3. a re-save publishes over the old copy, never frees it first --------------------------

RESAVE_NEW = {"after_manifest", "mid_retention"}


def _run_worker(base: Path, first: int, last: int, salt: int, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, WORKER, str(base), str(first), str(last), str(salt)],
        env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", [p for p in FAULT_POINTS if p != "mid_retention"])
def test_kill_during_a_resave_keeps_the_committed_copy(shm_dir, point):
    # Given step 2 committed with keep_last=1 (the only checkpoint)
    assert _run_worker(shm_dir, 1, 2, 0).returncode == 0
    # When a restarted job saves step 2 again, with other content, and dies at `point`
    proc = _run_worker(shm_dir, 2, 2, 1, {"MEMCKPT_FAULT_POINT": point, "MEMCKPT_FAULT_STEP": "2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Then step 2 is still loadable: the old content, or the new once its manifest is written
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=1) as m:
        assert m.latest() == 2
        assert_same(m.load(), state_for(2, 1 if point in RESAVE_NEW else 0))
    assert not list((shm_dir / "job").glob("step-*/*.prev"))


def test_failed_resave_vote_restores_the_committed_copy(shm_dir):
    from memckpt.engine.save_transaction import Ballot

    def failing_vote(step, ballot):
        return [ballot, Ballot(1, False, "rank 1 ran out of memory")]

    with memckpt.CheckpointManager(shm_dir, "job", keep_last=1) as m:
        m.save(3, {"v": torch.tensor(1.0)}).wait()
        m.engine.vote = failing_vote
        with pytest.raises(memckpt.CommitError, match="rank 1 ran out of memory"):
            m.save(3, {"v": torch.tensor(2.0)}).wait()
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=1) as m:
        assert m.load()["v"].item() == 1.0


# -- 4. ls, status and gc read the manifests, as recovery does -------------------------------


def _two_node_job(rank: int, world_size: int, base: str) -> None:
    os.environ["MEMCKPT_NODE_ID"] = f"node{rank}"
    with memckpt.CheckpointManager(
        Path(base) / f"node{rank}", "job", keep_last=2, timeout_s=30
    ) as m:
        for step in (1, 2, 3):
            m.save(step, {"x": torch.full((8,), float(step * 10 + rank))}).wait()


@pytest.mark.timeout(120)
def test_ls_gc_and_status_agree_with_recovery_on_a_multi_node_job(shm_dir, capsys):
    run_ranks(_two_node_job, 2, str(shm_dir), timeout=90)
    node0, node1 = shm_dir / "node0", shm_dir / "node1"
    # ls over both nodes: committed and complete; over one node: committed, rank 1 not here
    assert cli_main(["ls", str(node0), str(node1), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(s["step"], s["committed"], s["complete"]) for s in doc[0]["steps"]] == [
        (2, True, True),
        (3, True, True),
    ]
    assert cli_main(["ls", str(node0), "--json"]) == 0
    one = json.loads(capsys.readouterr().out)[0]["steps"]
    assert all(s["committed"] and s["missing"] == [1] for s in one)
    # status plans the same step recovery would
    assert cli_main(["status", str(node0), str(node1), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recovery"]["step"] == 3
    # gc deletes committed steps on a multi-node tree (it deleted nothing before)
    assert cli_main(["gc", str(node0 / "job"), "--keep", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == [2]
    assert not (node0 / "job" / "step-2").exists()
