"""Two node ids on one checkpoint directory are refused at setup, with what to set.

Following the old one-node warning literally (``MEMCKPT_NODE_ID`` per rank on one host)
made every rank its own "node" over one shared tree, and the first replicated save
crashed inside the buffer pool.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import memckpt
from memckpt.collectives import LocalCollectives
from memckpt.replication.replicator import PeerInfo, check_one_node_per_tree, tree_id
from multiproc import run_ranks


def test_two_node_ids_on_one_directory_are_refused_naming_ranks_ids_and_directory(tmp_path):
    # Given two ranks whose job directories are one directory, reached by two paths
    real = tmp_path / "ckpt" / "job"
    real.mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "ckpt")
    peers = [
        PeerInfo(0, "host/0", "127.0.0.1", 1, tree_id(real)),
        PeerInfo(1, "host/1", "127.0.0.1", 2, tree_id(tmp_path / "alias" / "job")),
    ]
    # When the ranks check what they exchanged at setup
    # Then they refuse, naming both ranks, both node ids, the directory and what to set
    with pytest.raises(memckpt.ReplicationConfigError) as e:
        check_one_node_per_tree(peers)
    msg = str(e.value)
    for part in ("ranks 0 and 1", "'host/0'", "'host/1'", str(real.resolve()),
                 "MEMCKPT_NODE_ID", "the same value for every rank of a node"):  # fmt: skip
        assert part in msg, (part, msg)


def test_one_node_id_per_directory_and_one_directory_per_node_are_accepted(tmp_path):
    a, b = tmp_path / "node0" / "job", tmp_path / "node1" / "job"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    check_one_node_per_tree([
        PeerInfo(0, "n0", "h", 1, tree_id(a)), PeerInfo(1, "n0", "h", 2, tree_id(a)),
        PeerInfo(2, "n1", "h", 3, tree_id(b)), PeerInfo(3, "n1", "h", 4, tree_id(b)),
        PeerInfo(4, "n2", "h", 5, None),  # a peer that did not say (older ranks' tables)
    ])  # fmt: skip


def _open_with_own_node_id(rank: int, world_size: int, base: str, api: str) -> str:
    state = {"x": torch.full((1024,), float(rank))}
    try:
        if api == "nvrx":  # as NVRx users do: LocalCheckpointManager with clique replication
            from memckpt.adapters.nvrx import (
                BasicTensorAwareStateDict,
                CliqueReplicationStrategy,
                LocalCheckpointManager,
            )

            strategy = CliqueReplicationStrategy.from_replication_params(1, 2)
            mgr = LocalCheckpointManager(str(Path(base) / "job"), "", strategy)
            mgr.find_latest()
            mgr.save(BasicTensorAwareStateDict(state), 1)
        else:
            with memckpt.CheckpointManager(base, "job", replication="pairwise", timeout_s=30,
                                           transfer_host="127.0.0.1") as m:  # fmt: skip
                m.save(1, state).wait()
    except memckpt.ReplicationConfigError as e:
        return str(e)
    return "opened and saved"


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("api", ["manager", "nvrx"])
def test_node_id_per_rank_on_one_shared_tree_is_refused_before_any_save(shm_dir, api):
    # Given two ranks on one host, one /dev/shm tree, and MEMCKPT_NODE_ID set per rank
    env = {r: {"MEMCKPT_NODE_ID": f"rank-{r}"} for r in (0, 1)}
    # When they open the job with replication
    out = run_ranks(_open_with_own_node_id, 2, str(shm_dir), api, timeout=90, env_per_rank=env)
    # Then every rank refuses at setup with the same clear error, and nothing was saved
    assert out[0] == out[1], out
    assert "ranks 0 and 1" in out[0] and "'rank-0'" in out[0] and "'rank-1'" in out[0], out[0]
    assert str(Path(os.path.realpath(shm_dir))) in out[0], out[0]
    assert not list(shm_dir.glob("**/step-*"))


def test_the_one_node_warning_says_the_same_value_for_every_rank_of_a_node(shm_dir, caplog):
    with memckpt.CheckpointManager(shm_dir, "job", replication="pairwise",
                                   collectives=LocalCollectives()):  # fmt: skip
        pass
    warning = next(
        r.getMessage() for r in caplog.records if "nothing to replicate" in r.getMessage()
    )
    assert "MEMCKPT_NODE_ID per node (the same value for every rank of a node)" in warning
