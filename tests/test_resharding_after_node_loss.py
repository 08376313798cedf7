"""Resharding after a node loss: 4 ranks on 2 nodes save; node 1's memory is wiped; the
job goes on with another number of ranks and nodes, through the docs' own restart lines.

Reading does not depend on the writer's replication setting, nor on whether that strategy
fits today's layout: where each copy lives is in the inventories.
"""

from __future__ import annotations

import shutil

import pytest

from multiproc import run_ranks
from reshard_workers import load_fsdp, save_fsdp

pytestmark = pytest.mark.slow

SAVED_NODES = {0: "node0", 1: "node0", 2: "node1", 3: "node1"}


def _env(nodes: dict[int, str]) -> dict[int, dict[str, str]]:
    return {r: {"MEMCKPT_NODE_ID": n} for r, n in nodes.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Step 3 of an FSDP2 job, saved by 4 ranks on 2 nodes with pairwise replication."""
    base = tmp_path_factory.mktemp("saved")
    ref = str(base / "reference.pt")
    out = run_ranks(save_fsdp, 4, str(base), ref, timeout=180, env_per_rank=_env(SAVED_NODES))
    assert out == dict.fromkeys(range(4), True)
    return base, ref


def _after_node1_loss(saved, tmp_path):
    """A copy of the cluster's memory with node 1's directory gone (the node was replaced)."""
    base, ref = saved
    shutil.copytree(base / "node0", tmp_path / "node0")
    return tmp_path, ref


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("nodes", "replication"),
    [
        ({0: "node0", 1: "node0", 2: "node1"}, None),  # the docs' first example, as written
        ({0: "node0", 1: "node0", 2: "node1"}, "pairwise"),  # pairwise cannot fit {2, 1}
        ({0: "node0", 1: "node0"}, None),  # 2 ranks, one node
        ({0: "node0", 1: "node0", 2: "node1", 3: "node1", 4: "node2"}, None),  # 5 on 3 nodes
    ],
    ids=["3-ranks-docs-example", "3-ranks-pairwise-unfit", "2-ranks-one-node", "5-ranks-3-nodes"],
)
def test_fsdp_state_saved_by_4_ranks_loads_bit_exact_after_node_loss(
    saved, tmp_path, nodes, replication
):
    base, ref = _after_node1_loss(saved, tmp_path)
    out = run_ranks(load_fsdp, len(nodes), str(base), ref, replication, timeout=180,
                    env_per_rank=_env(nodes))  # fmt: skip
    assert out[0]["mismatched"] == []
    if replication == "pairwise":  # cannot fit {2, 1}: the load works and says so, once
        assert len(out[0]["skipped"]) == 1 and not out[1]["skipped"], out


@pytest.mark.timeout(240)
def test_load_with_another_world_size_restores_the_lost_nodes_copies(saved, tmp_path):
    """4 -> 2 ranks, one per node: node 1 (replaced, empty) holds the step's objects again."""
    base, ref = _after_node1_loss(saved, tmp_path)
    nodes = {0: "node0", 1: "node1"}
    out = run_ranks(load_fsdp, 2, str(base), ref, "pairwise", timeout=180,
                    env_per_rank=_env(nodes))  # fmt: skip
    assert out[0]["mismatched"] == []
    every = [f"rank-{r}.mck" for r in range(4)]
    assert out[0]["files"] == every
    assert out[1]["files"] == every  # each of the 4 saved objects is on both nodes again
