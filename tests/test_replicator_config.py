"""Node identity, serving address and strategy parsing of the replicator (no processes)."""

from __future__ import annotations

import socket

import pytest
import torch

import memckpt
from memckpt.collectives import LocalCollectives
from memckpt.replication import RingReplicationStrategy
from memckpt.replication.replicator import check_strategy, default_host, default_node_id


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("MEMCKPT_NODE_ID", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MEMCKPT_TRANSFER_HOST",
                "MASTER_ADDR"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_node_id_comes_from_env_then_torchrun_then_local_world_size(clean_env):
    host = socket.gethostname()
    assert default_node_id(5) == host
    clean_env.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_node_id(5) == f"{host}/1"
    clean_env.setenv("GROUP_RANK", "3")
    assert default_node_id(5) == f"{host}/3"
    clean_env.setenv("MEMCKPT_NODE_ID", "rack2-n7")
    assert default_node_id(5) == "rack2-n7"


def test_serving_address(clean_env):
    assert default_host() == "127.0.0.1"
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    assert default_host() == "127.0.0.1"
    clean_env.setenv("MEMCKPT_TRANSFER_HOST", "::1")
    assert default_host() == "::1"


def test_strategy_specs_and_objects_are_accepted_and_garbage_is_not():
    assert check_strategy("ring:2") == RingReplicationStrategy(2)
    ring = RingReplicationStrategy(1)
    assert check_strategy(ring) is ring
    with pytest.raises(memckpt.ReplicationConfigError, match="unknown replication strategy"):
        check_strategy("mirror")
    with pytest.raises(memckpt.ReplicationConfigError, match="got int"):
        check_strategy(3)


def test_one_node_turns_replication_off_with_a_warning(shm_dir, caplog):
    with memckpt.CheckpointManager(shm_dir, "job", replication="pairwise",
                                   collectives=LocalCollectives()) as m:  # fmt: skip
        assert m.replicator is None
        r = m.save(1, {"t": torch.ones(4)}).wait()
        assert r.replicated is False and r.replication_bytes == 0
    assert "nothing to replicate to" in caplog.text
