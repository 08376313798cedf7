"""Replication strategies: placement rules, failure-domain invariants and spec parsing."""

from __future__ import annotations

import itertools

import pytest

from memckpt.errors import InvalidNameError
from memckpt.replication import (
    CliqueReplicationStrategy,
    NodeTopology,
    PairwiseReplicationStrategy,
    ReplicationConfigError,
    ReplicationPlan,
    ReplicationStrategy,
    RingReplicationStrategy,
    strategy_from_spec,
)

UNIFORM_SHAPES = [(nodes, per_node) for nodes in range(2, 9) for per_node in range(1, 5)]


def _uniform_cases() -> list[tuple[ReplicationStrategy, NodeTopology, int]]:
    """(strategy, topology, expected copies per rank) for every strategy that fits."""
    cases: list[tuple[ReplicationStrategy, NodeTopology, int]] = []
    for nodes, per_node in UNIFORM_SHAPES:
        topo = NodeTopology.uniform(nodes * per_node, per_node)
        cases.append((PairwiseReplicationStrategy(), topo, 1))
        for k in range(1, nodes):
            cases.append((RingReplicationStrategy(k), topo, k))
        for factor in range(2, nodes + 1):
            if nodes % factor == 0:
                cases.append((CliqueReplicationStrategy(factor, per_node), topo, factor - 1))
    return cases


CASES = _uniform_cases()
CASE_IDS = [f"{s.spec}-{t.num_nodes}x{t.ranks_per_node}" for s, t, _ in CASES]


# ---------------------------------------------------------------- NodeTopology


def test_uniform_topology_groups_consecutive_ranks_into_nodes() -> None:
    topo = NodeTopology.uniform(6, 3)

    assert topo.node_of == (0, 0, 0, 1, 1, 1)
    assert topo.nodes == (0, 1)
    assert topo.ranks_on(1) == (3, 4, 5)
    assert topo.local_rank(4) == 1
    assert topo.rank_at(1, 2) == 5
    assert topo.ranks_per_node == 3


def test_from_node_ids_numbers_hostnames_in_order_of_first_appearance() -> None:
    topo = NodeTopology.from_node_ids(["host-b", "host-a", "host-b", "host-a"])

    assert topo.node_of == (0, 1, 0, 1)
    assert topo.ranks_on(0) == (0, 2)
    assert topo.local_rank(2) == 1
    assert topo.local_rank(3) == 1


def test_topology_with_uneven_nodes_reports_no_ranks_per_node() -> None:
    topo = NodeTopology.from_node_ids([0, 0, 0, 1])

    assert topo.ranks_per_node is None
    assert topo.num_nodes == 2


def test_topology_rejects_a_node_id_without_ranks() -> None:
    with pytest.raises(ReplicationConfigError, match=r"node\(s\) \[1\] hold none"):
        NodeTopology((0, 0, 2, 2))


@pytest.mark.parametrize("node_of", [(), (0, -1), (0, True), (0, "1")])
def test_topology_rejects_empty_or_non_integer_node_ids(node_of: tuple) -> None:
    with pytest.raises(ReplicationConfigError):
        NodeTopology(node_of)


def test_uniform_topology_rejects_world_size_not_multiple_of_node_size() -> None:
    with pytest.raises(ReplicationConfigError, match="not a multiple of 4"):
        NodeTopology.uniform(6, 4)


def test_topology_rejects_out_of_range_rank_and_node() -> None:
    topo = NodeTopology.uniform(4, 2)

    with pytest.raises(InvalidNameError, match="outside world size 4"):
        topo.local_rank(4)
    with pytest.raises(ReplicationConfigError, match="node 2 does not exist"):
        topo.ranks_on(2)
    with pytest.raises(ReplicationConfigError, match="local rank 2 does not exist"):
        topo.rank_at(0, 2)


def test_topology_is_a_hashable_value() -> None:
    assert NodeTopology.uniform(4, 2) == NodeTopology.from_node_ids(["a", "a", "b", "b"])
    assert len({NodeTopology.uniform(4, 2), NodeTopology((0, 0, 1, 1))}) == 1


# ---------------------------------------------------------------- invariants, all strategies


@pytest.mark.parametrize(("strategy", "topo", "copies"), CASES, ids=CASE_IDS)
def test_no_strategy_places_a_replica_on_the_owner_node(
    strategy: ReplicationStrategy, topo: NodeTopology, copies: int
) -> None:
    plan = strategy.plan(topo)

    for owner in range(topo.world_size):
        holder_nodes = {topo.node(h) for h in plan.holders_of(owner)}
        assert topo.node(owner) not in holder_nodes


@pytest.mark.parametrize(("strategy", "topo", "copies"), CASES, ids=CASE_IDS)
def test_every_owner_gets_the_expected_number_of_distinct_replicas(
    strategy: ReplicationStrategy, topo: NodeTopology, copies: int
) -> None:
    plan = strategy.plan(topo)

    for owner in range(topo.world_size):
        holders = plan.holders_of(owner)
        assert len(holders) == copies
        assert len({topo.node(h) for h in holders}) == copies
        assert holders == strategy.replicas_of(owner, topo)


@pytest.mark.parametrize(("strategy", "topo", "copies"), CASES, ids=CASE_IDS)
def test_every_rank_data_survives_the_loss_of_any_single_node(
    strategy: ReplicationStrategy, topo: NodeTopology, copies: int
) -> None:
    plan = strategy.plan(topo)

    for failed in topo.nodes:
        assert plan.lost_ranks([failed]) == ()


@pytest.mark.parametrize(("strategy", "topo", "copies"), CASES, ids=CASE_IDS)
def test_held_by_is_the_inverse_of_holders_of(
    strategy: ReplicationStrategy, topo: NodeTopology, copies: int
) -> None:
    plan = strategy.plan(topo)

    pairs = {(o, h) for o in range(topo.world_size) for h in plan.holders_of(o)}
    inverse = {(o, h) for h in range(topo.world_size) for o in plan.held_by(h)}
    assert pairs == inverse


@pytest.mark.parametrize(("nodes", "per_node"), UNIFORM_SHAPES)
def test_ring_k_survives_the_loss_of_any_k_nodes(nodes: int, per_node: int) -> None:
    topo = NodeTopology.uniform(nodes * per_node, per_node)

    for k in range(1, nodes):
        plan = RingReplicationStrategy(k).plan(topo)
        for failed in itertools.combinations(topo.nodes, k):
            assert plan.lost_ranks(failed) == (), (k, failed)


def test_ring_k_loses_data_when_k_plus_one_consecutive_nodes_fail() -> None:
    topo = NodeTopology.uniform(8, 2)
    plan = RingReplicationStrategy(2).plan(topo)

    lost = plan.lost_ranks([1, 2, 3])

    assert lost == (2, 3)


def test_every_holder_carries_the_same_load_in_uniform_topologies() -> None:
    topo = NodeTopology.uniform(5 * 3, 3)

    for strategy in (PairwiseReplicationStrategy(), RingReplicationStrategy(3)):
        plan = strategy.plan(topo)
        loads = {len(plan.held_by(h)) for h in range(topo.world_size)}
        assert len(loads) == 1, strategy


# ---------------------------------------------------------------- pairwise


def test_pairwise_pairs_same_local_rank_of_neighbouring_nodes() -> None:
    topo = NodeTopology.uniform(8, 2)

    plan = PairwiseReplicationStrategy().plan(topo)

    assert plan.as_dict() == {
        0: (2,),
        1: (3,),
        2: (0,),
        3: (1,),
        4: (6,),
        5: (7,),
        6: (4,),
        7: (5,),
    }


def test_pairwise_with_odd_node_count_rings_the_last_three_nodes() -> None:
    topo = NodeTopology.uniform(5, 1)

    plan = PairwiseReplicationStrategy().plan(topo)

    assert plan.as_dict() == {0: (1,), 1: (0,), 2: (3,), 3: (4,), 4: (2,)}


def test_pairwise_with_three_nodes_is_a_ring() -> None:
    plan = PairwiseReplicationStrategy().plan(NodeTopology.uniform(6, 2))

    assert plan.as_dict() == {0: (2,), 1: (3,), 2: (4,), 3: (5,), 4: (0,), 5: (1,)}


def test_pairwise_follows_hostnames_not_rank_order() -> None:
    topo = NodeTopology.from_node_ids(["a", "b", "a", "b"])

    plan = PairwiseReplicationStrategy().plan(topo)

    assert plan.as_dict() == {0: (1,), 1: (0,), 2: (3,), 3: (2,)}


def test_pairwise_rejects_a_single_node() -> None:
    with pytest.raises(ReplicationConfigError, match=r"at least 2 nodes.*has 1"):
        PairwiseReplicationStrategy().plan(NodeTopology.uniform(4, 4))


def test_pairwise_rejects_nodes_of_different_sizes() -> None:
    topo = NodeTopology.from_node_ids(["a", "a", "b"])

    with pytest.raises(ReplicationConfigError, match=r"same number of ranks.*\{0: 2, 1: 1\}"):
        PairwiseReplicationStrategy().replicas_of(0, topo)


# ---------------------------------------------------------------- ring


def test_ring_places_copies_on_the_next_k_nodes_wrapping() -> None:
    topo = NodeTopology.uniform(8, 2)

    holders = RingReplicationStrategy(2).replicas_of(7, topo)

    assert holders == (1, 3)


def test_ring_rejects_k_not_below_the_node_count() -> None:
    with pytest.raises(ReplicationConfigError, match=r"ring:3 replication needs at least 4 nodes"):
        RingReplicationStrategy(3).plan(NodeTopology.uniform(6, 2))


@pytest.mark.parametrize("k", [0, -1, True, 1.5])
def test_ring_rejects_non_positive_or_non_integer_k(k: object) -> None:
    with pytest.raises(ReplicationConfigError, match="k"):
        RingReplicationStrategy(k)  # type: ignore[arg-type]


# ---------------------------------------------------------------- clique


def test_clique_matches_the_nvrx_documented_grouping() -> None:
    strategy = CliqueReplicationStrategy(replication_factor=2, replication_jump=8)

    cliques = strategy.cliques(32)

    expected = [(b, b + 8) for b in range(8)] + [(b, b + 8) for b in range(16, 24)]
    assert cliques == tuple(expected)


def test_clique_members_hold_every_other_members_data() -> None:
    topo = NodeTopology.uniform(12, 2)
    strategy = CliqueReplicationStrategy(replication_factor=3, replication_jump=2)

    plan = strategy.plan(topo)

    assert plan.holders_of(1) == (3, 5)
    assert plan.holders_of(3) == (1, 5)
    assert plan.holders_of(8) == (6, 10)
    assert plan.held_by(5) == (1, 3)


def test_clique_rejects_world_size_not_divisible_by_jump_times_factor() -> None:
    strategy = CliqueReplicationStrategy(replication_factor=2, replication_jump=4)

    with pytest.raises(ReplicationConfigError, match=r"world size 12.*divisible by.*= 8"):
        strategy.plan(NodeTopology.uniform(12, 4))


def test_clique_rejects_two_members_on_one_node_and_names_them() -> None:
    strategy = CliqueReplicationStrategy(replication_factor=2, replication_jump=1)

    with pytest.raises(
        ReplicationConfigError,
        match=r"clique \(0, 1\) puts ranks 0 and 1 on the same node 0.*replication_jump to 2",
    ):
        strategy.plan(NodeTopology.uniform(4, 2))


def test_clique_with_factor_one_keeps_no_copies() -> None:
    plan = CliqueReplicationStrategy(1, 1).plan(NodeTopology.uniform(3, 1))

    assert plan.as_dict() == {0: (), 1: (), 2: ()}
    assert plan.lost_ranks([1]) == (1,)


def test_clique_works_on_uneven_nodes_when_members_are_on_distinct_nodes() -> None:
    topo = NodeTopology.from_node_ids(["a", "a", "b", "b", "c", "d"])

    plan = CliqueReplicationStrategy(replication_factor=3, replication_jump=2).plan(topo)

    assert topo.ranks_per_node is None
    assert plan.holders_of(0) == (2, 4)
    assert plan.holders_of(5) == (1, 3)
    assert plan.lost_ranks([0]) == ()


def test_clique_with_uneven_nodes_rejects_colocated_members_without_jump_hint() -> None:
    topo = NodeTopology.from_node_ids(["a", "b", "c", "a", "a", "b"])

    with pytest.raises(ReplicationConfigError, match=r"ranks 0 and 3 on the same node 0: a copy"):
        CliqueReplicationStrategy(replication_factor=2, replication_jump=3).plan(topo)


# ---------------------------------------------------------------- plan


def test_plan_rejects_a_holder_on_the_owner_node() -> None:
    topo = NodeTopology.uniform(4, 2)

    with pytest.raises(ReplicationConfigError, match="both run on node 0"):
        ReplicationPlan(topo, ((1,), (2,), (0,), (0,)))


def test_plan_rejects_a_repeated_holder() -> None:
    topo = NodeTopology.uniform(2, 1)

    with pytest.raises(ReplicationConfigError, match="twice"):
        ReplicationPlan(topo, ((1, 1), (0,)))


def test_plan_describe_lists_every_owner_with_holder_nodes() -> None:
    plan = PairwiseReplicationStrategy().plan(NodeTopology.uniform(4, 2))

    lines = plan.describe().splitlines()

    assert len(lines) == 5
    assert lines[1].split() == ["0", "0", "2@1"]


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("pairwise", PairwiseReplicationStrategy()),
        (" Ring:2 ", RingReplicationStrategy(2)),
        ("clique:2:1", CliqueReplicationStrategy(replication_factor=2, replication_jump=1)),
        ("clique:3:8", CliqueReplicationStrategy(replication_factor=3, replication_jump=8)),
    ],
)
def test_strategy_from_spec_builds_the_named_strategy(
    spec: str, expected: ReplicationStrategy
) -> None:
    strategy = strategy_from_spec(spec)

    assert strategy == expected
    assert strategy_from_spec(strategy.spec) == strategy


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mirror", "unknown replication strategy 'mirror'"),
        ("", "unknown replication strategy ''"),
        ("ring", "'ring' takes 1 integer"),
        ("ring:two", "malformed replication spec 'ring:two'"),
        ("ring:-1", "malformed"),
        ("ring:0", "k .* must be an integer >= 1"),
        ("clique:2", "'clique' takes 2 integer"),
        ("pairwise:1", "'pairwise' takes 0 integer"),
        ("ring:1e3", "malformed"),
        ("ring:\u0662", "malformed"),
    ],
)
def test_strategy_from_spec_rejects_malformed_specs_with_the_valid_forms(
    spec: str, message: str
) -> None:
    with pytest.raises(ReplicationConfigError, match=message):
        strategy_from_spec(spec)


def test_strategies_describe_themselves_with_their_parameters() -> None:
    assert repr(RingReplicationStrategy(2)) == "RingReplicationStrategy(k=2)"
    assert "clique:3:8" in CliqueReplicationStrategy(3, 8).describe()
    assert "next 2 node(s)" in RingReplicationStrategy(2).describe()
    assert PairwiseReplicationStrategy().describe().startswith("pairwise")
