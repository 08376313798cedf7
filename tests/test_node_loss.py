"""Simulated nodes on one machine: lose a node's memory, restart, recover from peers."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from memckpt.replication import NodeTopology, strategy_from_spec
from memckpt.storage.reader import ObjectReader
from memckpt.tools.cli import main
from multiproc import run_ranks
from replication_workers import (
    die_mid_transfer,
    recover,
    replication_fails_midway,
    save_steps,
)

pytestmark = pytest.mark.slow


def _status(capsys, paths: list[str]) -> dict:
    capsys.readouterr()
    code = main(["status", *paths, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code in (0, 1)  # 1 when nothing can be recovered (or damage is found)
    return doc


def _held(base: Path, node: int, step: int) -> list[int]:
    d = base / f"node{node}" / "job" / f"step-{step}"
    return sorted(int(p.stem.split("-")[1]) for p in d.glob("rank-*.mck"))


@pytest.mark.parametrize(
    ("strategy", "nodes", "rpn", "lost"),
    [
        ("pairwise", 2, 1, 1),
        ("pairwise", 2, 2, 0),
        ("pairwise", 3, 1, 2),  # odd count: the three nodes form a ring
        ("ring:1", 3, 1, 0),
        ("clique:2:2", 2, 2, 1),  # ranks {0,2} and {1,3}: each clique spans both nodes
    ],
)
def test_node_loss_recovers_bit_exact_and_fetches_only_what_is_missing(
    shm_dir, capsys, strategy, nodes, rpn, lost
):
    world = nodes * rpn
    # Given a job that saved and replicated steps 1..3
    first = run_ranks(save_steps, world, str(shm_dir), rpn, strategy, [1, 2, 3], timeout=90)
    assert all(r["results"][s][0] for r in first.values() for s in (1, 2, 3)), first
    assert all(r["results"][s][1] > 0 for r in first.values() for s in (1, 2, 3)), first
    # When one node dies: its processes are gone and its memory is wiped
    shutil.rmtree(shm_dir / f"node{lost}")
    # memckpt status, from the surviving nodes' directories, predicts the recovery
    survivors = [str(shm_dir / f"node{n}") for n in range(nodes) if n != lost]
    status = _status(capsys, survivors)
    assert status["recovery"]["step"] == 3
    assert [f["rank"] for f in status["recovery"]["fetches"]] == [
        r for r in range(world) if r // rpn == lost
    ]
    # Then a restart recovers every rank bit-exactly (asserted in the worker)
    out = run_ranks(recover, world, str(shm_dir), rpn, strategy, timeout=90)
    lost_ranks = [r for r in range(world) if r // rpn == lost]
    assert {o["latest"] for o in out.values()} == {3}
    # and the plan fetches exactly the lost node's ranks, from other nodes
    fetches = out[0]["fetches"]
    assert [r for r, _ in fetches] == lost_ranks
    assert all(src // rpn != lost for _, src in fetches)
    for r in range(world):
        assert (out[r]["fetched_bytes"] > 0) == (r in lost_ranks)
    # and re-replication restored what the strategy places on the replaced node
    plan = strategy_from_spec(strategy).plan(NodeTopology.uniform(world, rpn))
    expected = sorted(set(lost_ranks) | {o for h in lost_ranks for o in plan.held_by(h)})
    assert _held(shm_dir, lost, 3) == expected


def test_losing_a_whole_replica_group_gives_none_quickly(shm_dir, capsys):
    # pairwise over 4 nodes pairs (0,1) and (2,3)
    run_ranks(save_steps, 4, str(shm_dir), 1, "pairwise", [1, 2], timeout=90)
    shutil.rmtree(shm_dir / "node0")
    shutil.rmtree(shm_dir / "node1")
    status = _status(capsys, [str(shm_dir / "node2"), str(shm_dir / "node3")])
    assert status["recovery"]["step"] is None
    assert "no live copy of rank(s) [0, 1]" in status["recovery"]["skipped"]["2"]
    out = run_ranks(recover, 4, str(shm_dir), 1, "pairwise", timeout=90)
    for o in out.values():
        assert o["latest"] is None and not o["loaded"]
        assert o["elapsed"] < 5.0, o


def test_unreplicated_step_is_reported_and_the_replicated_one_kept(shm_dir):
    out = run_ranks(replication_fails_midway, 2, str(shm_dir), timeout=90)
    for o in out.values():
        assert o["r1"] is True
        assert o["r2"] is False
        # keep_last=1, yet step 1 stays: it is the newest step replicated everywhere
        assert o["steps"] == ["step-1", "step-2"]


@pytest.mark.parametrize(("point", "victim"), [("mid_replica_recv", 1), ("mid_replica_send", 0)])
def test_peer_killed_mid_transfer_leaves_no_partial_replica(shm_dir, point, victim):
    env = {victim: {"MEMCKPT_FAULT_POINT": point, "MEMCKPT_FAULT_STEP": "2"}}
    t0 = time.monotonic()
    out = run_ranks(
        die_mid_transfer, 2, str(shm_dir), timeout=90, env_per_rank=env, expect_dead=(victim,)
    )
    survivor = 1 - victim
    # the survivor's save of step 2 fails (its peer vanished) instead of hanging
    assert out[survivor]["error"] is not None
    assert time.monotonic() - t0 < 60
    # rank 0's step-2 object was cut off in flight: node 1 never shows it
    assert 0 not in _held(shm_dir, 1, 2)
    # whatever is visible is complete and intact, and step 2 is not committed anywhere
    for node in (0, 1):
        for obj in (shm_dir / f"node{node}" / "job").glob("step-*/rank-*.mck"):
            with ObjectReader(obj) as reader:
                assert reader.verify() == [], obj
        assert not (shm_dir / f"node{node}" / "job" / "step-2" / ".committed").exists()
    # step 1 is still complete and replicated on both nodes
    assert _held(shm_dir, 0, 1) == [0, 1] and _held(shm_dir, 1, 1) == [0, 1]


def test_a_damaged_copy_on_the_planned_source_falls_over_to_another_holder(shm_dir):
    # ring:2 over 3 nodes: rank 0's data lives on nodes 1 and 2 as well
    run_ranks(save_steps, 3, str(shm_dir), 1, "ring:2", [1, 2, 3], timeout=90)
    shutil.rmtree(shm_dir / "node0")
    replica = shm_dir / "node1" / "job" / "step-3" / "rank-0.mck"
    with ObjectReader(replica) as r:
        off = r.index.tensors[0].offset + 100
    with open(replica, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    out = run_ranks(recover, 3, str(shm_dir), 1, "ring:2", timeout=90)
    # the plan said node 1; its copy failed its checksums; node 2's copy was used
    assert out[0]["fetches"] == [(0, 1)]
    assert out[0]["source"] == 2 and out[0]["latest"] == 3
