"""Replication strategies: which ranks hold copies of which rank's data.

Everything here is a pure decision over a :class:`NodeTopology` (which rank runs on
which node, a node being one failure domain); nothing here does I/O or talks to
other processes. The transport and coordination layers call :meth:`plan` and act
on the resulting :class:`ReplicationPlan`.

Every strategy holds one invariant: no copy of a rank's data is placed on the node
that owns it, because losing that node would lose the copy too.

Strategies and their specs (see :func:`strategy_from_spec`):

==================  ==========================================================
``pairwise``        nodes paired (0,1), (2,3), ...; an odd node count puts the
                    last three nodes in a ring; one copy on the same local rank
                    of the partner node
``ring:K``          K copies, on the same local rank of the next K nodes
``clique:F:J``      NVRx clique: ranks b, b+J, b+2J, ... cut into cliques of F;
                    every clique member holds a copy of every other member
==================  ==========================================================
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from memckpt.errors import ReplicationConfigError
from memckpt.ids import validate_rank

__all__ = [
    "CliqueReplicationStrategy",
    "NodeTopology",
    "PairwiseReplicationStrategy",
    "ReplicationConfigError",
    "ReplicationPlan",
    "ReplicationStrategy",
    "RingReplicationStrategy",
    "strategy_from_spec",
]

_SPEC_FORMS: Final = "'pairwise', 'ring:K' (K >= 1) or 'clique:F:J' (factor F >= 1, jump J >= 1)"
_UINT_RE: Final = re.compile(r"[0-9]{1,9}")


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ReplicationConfigError(f"{what} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class NodeTopology:
    """Which node (failure domain) each global rank runs on.

    ``node_of[r]`` is the node id of rank ``r``; node ids are ``0 .. num_nodes - 1``
    and every node holds at least one rank. A rank's local rank is its position
    among the ranks of its node in increasing global-rank order.
    """

    node_of: tuple[int, ...]
    _members: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    _local: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        node_of = tuple(self.node_of)
        if not node_of:
            raise ReplicationConfigError("a topology needs at least one rank, got none")
        for rank, node in enumerate(node_of):
            if isinstance(node, bool) or not isinstance(node, int) or node < 0:
                raise ReplicationConfigError(
                    f"node id of rank {rank} must be a non-negative integer, got {node!r}"
                )
        members: list[list[int]] = [[] for _ in range(max(node_of) + 1)]
        local: list[int] = []
        for rank, node in enumerate(node_of):
            local.append(len(members[node]))
            members[node].append(rank)
        empty = [node for node, ranks in enumerate(members) if not ranks]
        if empty:
            raise ReplicationConfigError(
                f"node ids must be 0..{len(members) - 1} with every node holding a rank, "
                f"but node(s) {empty} hold none; build the topology with "
                "NodeTopology.from_node_ids() to number arbitrary node labels densely"
            )
        object.__setattr__(self, "node_of", node_of)
        object.__setattr__(self, "_members", tuple(tuple(m) for m in members))
        object.__setattr__(self, "_local", tuple(local))

    @classmethod
    def uniform(cls, world_size: int, ranks_per_node: int) -> NodeTopology:
        """Topology where ranks ``[i * ranks_per_node, (i + 1) * ranks_per_node)`` form node i."""
        world_size = _positive_int(world_size, "world_size")
        ranks_per_node = _positive_int(ranks_per_node, "ranks_per_node")
        if world_size % ranks_per_node:
            raise ReplicationConfigError(
                f"world size {world_size} is not a multiple of {ranks_per_node} ranks per node"
            )
        return cls(tuple(rank // ranks_per_node for rank in range(world_size)))

    @classmethod
    def from_node_ids(cls, node_ids: Sequence[Hashable]) -> NodeTopology:
        """Topology from one node label per global rank (hostname, node index...).

        Labels are numbered densely in order of first appearance, so every rank
        that builds a topology from the same gathered list gets the same one.
        """
        if isinstance(node_ids, (str, bytes)):
            raise ReplicationConfigError(
                "node_ids must be a sequence with one node label per rank, not a single string"
            )
        numbering: dict[Hashable, int] = {}
        return cls(tuple(numbering.setdefault(label, len(numbering)) for label in node_ids))

    @property
    def world_size(self) -> int:
        return len(self.node_of)

    @property
    def num_nodes(self) -> int:
        return len(self._members)

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(range(len(self._members)))

    @property
    def ranks_per_node(self) -> int | None:
        """Ranks on every node, or None if nodes hold different numbers of ranks."""
        sizes = {len(ranks) for ranks in self._members}
        return sizes.pop() if len(sizes) == 1 else None

    def ranks_on(self, node: int) -> tuple[int, ...]:
        """Global ranks on ``node``, in increasing order."""
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < self.num_nodes:
            raise ReplicationConfigError(
                f"node {node!r} does not exist; the topology has nodes 0..{self.num_nodes - 1}"
            )
        return self._members[node]

    def node(self, rank: int) -> int:
        """Node id of ``rank``."""
        return self.node_of[validate_rank(rank, self.world_size)]

    def local_rank(self, rank: int) -> int:
        """Position of ``rank`` among the ranks of its node."""
        return self._local[validate_rank(rank, self.world_size)]

    def rank_at(self, node: int, local_rank: int) -> int:
        """Global rank with ``local_rank`` on ``node``."""
        ranks = self.ranks_on(node)
        if isinstance(local_rank, bool) or not isinstance(local_rank, int):
            raise ReplicationConfigError(f"local rank must be an integer, got {local_rank!r}")
        if not 0 <= local_rank < len(ranks):
            raise ReplicationConfigError(
                f"node {node} has {len(ranks)} rank(s); local rank {local_rank} does not exist"
            )
        return ranks[local_rank]

    def require_uniform(self, strategy: str) -> int:
        """Return the ranks per node, or raise naming ``strategy`` if nodes differ in size."""
        per_node = self.ranks_per_node
        if per_node is None:
            sizes = {node: len(ranks) for node, ranks in enumerate(self._members)}
            raise ReplicationConfigError(
                f"{strategy} replication needs the same number of ranks on every node, "
                f"got ranks per node {sizes}; use clique replication for uneven nodes"
            )
        return per_node


@dataclass(frozen=True)
class ReplicationPlan:
    """Which ranks hold a copy of each rank's data; ``holders[owner]`` excludes the owner.

    Holders are listed in the strategy's order of preference. Construction checks
    that no holder is the owner, repeats, or sits on the owner's node.
    """

    topology: NodeTopology
    holders: tuple[tuple[int, ...], ...]
    _held_by: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        topo = self.topology
        holders = tuple(tuple(h) for h in self.holders)
        if len(holders) != topo.world_size:
            raise ReplicationConfigError(
                f"a plan needs holders for each of {topo.world_size} ranks, got {len(holders)}"
            )
        held_by: list[list[int]] = [[] for _ in range(topo.world_size)]
        for owner, owner_holders in enumerate(holders):
            if len(set(owner_holders)) != len(owner_holders):
                raise ReplicationConfigError(f"rank {owner} lists a holder twice: {owner_holders}")
            for holder in owner_holders:
                validate_rank(holder, topo.world_size)
                if topo.node_of[holder] == topo.node_of[owner]:
                    raise ReplicationConfigError(
                        f"rank {holder} would hold a copy of rank {owner}'s data, but both run "
                        f"on node {topo.node_of[owner]}: losing that node would lose both"
                    )
                held_by[holder].append(owner)
        object.__setattr__(self, "holders", holders)
        object.__setattr__(self, "_held_by", tuple(tuple(sorted(o)) for o in held_by))

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    def holders_of(self, owner: int) -> tuple[int, ...]:
        """Ranks that hold a copy of ``owner``'s data (not ``owner`` itself)."""
        return self.holders[validate_rank(owner, self.world_size)]

    def held_by(self, holder: int) -> tuple[int, ...]:
        """Owners whose data ``holder`` keeps a copy of, in increasing rank order."""
        return self._held_by[validate_rank(holder, self.world_size)]

    def as_dict(self) -> dict[int, tuple[int, ...]]:
        """Owner rank -> holder ranks."""
        return dict(enumerate(self.holders))

    def lost_ranks(self, failed_nodes: Iterable[int]) -> tuple[int, ...]:
        """Ranks whose data has no copy left once every node in ``failed_nodes`` is gone."""
        failed = set(failed_nodes)
        for node in failed:
            self.topology.ranks_on(node)
        node_of = self.topology.node_of
        return tuple(
            owner
            for owner, owner_holders in enumerate(self.holders)
            if node_of[owner] in failed and all(node_of[h] in failed for h in owner_holders)
        )

    def describe(self) -> str:
        """Operator view: one line per owner rank with its node and its holders' nodes."""
        node_of = self.topology.node_of
        lines = [f"{'owner':>8} {'node':>5}  holders (rank@node)"]
        for owner, owner_holders in enumerate(self.holders):
            where = ", ".join(f"{h}@{node_of[h]}" for h in owner_holders) or "-"
            lines.append(f"{owner:>8} {node_of[owner]:>5}  {where}")
        return "\n".join(lines)


class ReplicationStrategy(ABC):
    """Decides which ranks hold copies of each rank's data, given a node topology.

    Subclasses implement :meth:`_check` (raise ReplicationConfigError if the topology
    does not fit) and :meth:`_replicas` (holders of one rank, topology already checked).
    """

    @property
    @abstractmethod
    def spec(self) -> str:
        """The string :func:`strategy_from_spec` turns back into this strategy."""

    @abstractmethod
    def describe(self) -> str:
        """One sentence saying where copies go, with the parameters."""

    @abstractmethod
    def _check(self, topology: NodeTopology) -> None: ...

    @abstractmethod
    def _replicas(self, rank: int, topology: NodeTopology) -> tuple[int, ...]: ...

    def replicas_of(self, rank: int, topology: NodeTopology) -> tuple[int, ...]:
        """Ranks holding copies of ``rank``'s data, excluding ``rank``, in order of preference."""
        validate_rank(rank, topology.world_size)
        self._check(topology)
        return self._replicas(rank, topology)

    def plan(self, topology: NodeTopology) -> ReplicationPlan:
        """Holders of every rank's data; raises ReplicationConfigError if the topology is unfit."""
        self._check(topology)
        return ReplicationPlan(
            topology, tuple(self._replicas(r, topology) for r in range(topology.world_size))
        )


def _require_nodes(topology: NodeTopology, minimum: int, strategy: str) -> None:
    if topology.num_nodes < minimum:
        raise ReplicationConfigError(
            f"{strategy} replication needs at least {minimum} nodes (failure domains), "
            f"the topology has {topology.num_nodes}; a copy on the owner's own node "
            "would not survive that node's loss"
        )


@dataclass(frozen=True)
class PairwiseReplicationStrategy(ReplicationStrategy):
    """One copy on the same local rank of the partner node.

    Nodes are paired (0, 1), (2, 3), ...; with an odd node count the last three nodes
    form a ring n-3 -> n-2 -> n-1 -> n-3 (the arrow points from owner to holder).
    Needs at least two nodes and the same number of ranks on every node.
    """

    @property
    def spec(self) -> str:
        return "pairwise"

    def describe(self) -> str:
        return (
            "pairwise: one copy on the same local rank of the partner node; "
            "nodes paired (0,1), (2,3), ..., the last three in a ring when the count is odd"
        )

    def _check(self, topology: NodeTopology) -> None:
        _require_nodes(topology, 2, "pairwise")
        topology.require_uniform("pairwise")

    @staticmethod
    def partner_node(node: int, num_nodes: int) -> int:
        """Node that holds the copies of ``node``'s ranks."""
        if num_nodes % 2 and node >= num_nodes - 3:
            first = num_nodes - 3
            return first + (node - first + 1) % 3
        return node ^ 1

    def _replicas(self, rank: int, topology: NodeTopology) -> tuple[int, ...]:
        partner = self.partner_node(topology.node_of[rank], topology.num_nodes)
        return (topology.rank_at(partner, topology.local_rank(rank)),)


@dataclass(frozen=True)
class RingReplicationStrategy(ReplicationStrategy):
    """``k`` copies, on the same local rank of each of the next ``k`` nodes (wrapping).

    Survives the loss of any ``k`` nodes. Needs more than ``k`` nodes and the same
    number of ranks on every node.
    """

    k: int = 1

    def __post_init__(self) -> None:
        _positive_int(self.k, "ring replication k (copies per rank)")

    @property
    def spec(self) -> str:
        return f"ring:{self.k}"

    def describe(self) -> str:
        return f"ring:{self.k}: copies on the same local rank of the next {self.k} node(s)"

    def _check(self, topology: NodeTopology) -> None:
        _require_nodes(topology, self.k + 1, f"ring:{self.k}")
        topology.require_uniform(f"ring:{self.k}")

    def _replicas(self, rank: int, topology: NodeTopology) -> tuple[int, ...]:
        node, local = topology.node_of[rank], topology.local_rank(rank)
        n = topology.num_nodes
        return tuple(topology.rank_at((node + i) % n, local) for i in range(1, self.k + 1))


@dataclass(frozen=True)
class CliqueReplicationStrategy(ReplicationStrategy):
    """NVRx clique replication: every member of a clique holds every other member's data.

    Ranks ``b, b+J, b+2J, ...`` (``J`` = ``replication_jump``, ``b < J``) form a chain
    that is cut into cliques of ``F`` consecutive members (``F`` = ``replication_factor``),
    so each rank's data ends up on ``F - 1`` other ranks; ``F = 1`` means no copies.
    As in NVIDIA Resiliency Extension, the world size must be divisible by ``J * F``.
    Set ``J`` to the ranks per node so that clique members sit on different nodes;
    a clique with two ranks on one node is rejected.
    """

    replication_factor: int = 2
    replication_jump: int = 1

    def __post_init__(self) -> None:
        _positive_int(self.replication_factor, "clique replication_factor")
        _positive_int(self.replication_jump, "clique replication_jump")

    @property
    def spec(self) -> str:
        return f"clique:{self.replication_factor}:{self.replication_jump}"

    def describe(self) -> str:
        f, j = self.replication_factor, self.replication_jump
        return (
            f"clique:{f}:{j}: ranks b, b+{j}, b+{2 * j}, ... cut into cliques of {f}; "
            f"each rank's data copied to the other {f - 1} member(s) of its clique"
        )

    def cliques(self, world_size: int) -> tuple[tuple[int, ...], ...]:
        """Every clique of a world of ``world_size`` ranks, sorted by first member."""
        f, j = self.replication_factor, self.replication_jump
        if world_size % (j * f):
            raise ReplicationConfigError(
                f"clique replication cannot split world size {world_size} into cliques: "
                f"it must be divisible by replication_jump * replication_factor = {j} * {f} "
                f"= {j * f} (each chain b, b+{j}, ... holds {world_size // j} ranks, "
                f"to be cut into cliques of {f})"
            )
        groups = [
            tuple(range(start, start + j * f, j))
            for base in range(j)
            for start in range(base, world_size, j * f)
        ]
        return tuple(sorted(groups))

    def _check(self, topology: NodeTopology) -> None:
        node_of = topology.node_of
        for clique in self.cliques(topology.world_size):
            seen: dict[int, int] = {}
            for rank in clique:
                other = seen.setdefault(node_of[rank], rank)
                if other != rank:
                    hint = (
                        f"; set replication_jump to {topology.ranks_per_node} (the ranks per node)"
                        if topology.ranks_per_node
                        else ""
                    )
                    raise ReplicationConfigError(
                        f"clique {clique} puts ranks {other} and {rank} on the same node "
                        f"{node_of[rank]}: a copy would share the owner's failure domain{hint}"
                    )

    def _replicas(self, rank: int, topology: NodeTopology) -> tuple[int, ...]:
        f, j = self.replication_factor, self.replication_jump
        base, position = rank % j, rank // j
        first = base + (position // f) * f * j
        return tuple(m for m in range(first, first + f * j, j) if m != rank)


def strategy_from_spec(spec: str) -> ReplicationStrategy:
    """Parse ``'pairwise'``, ``'ring:K'`` or ``'clique:F:J'`` (F = factor, J = jump)."""
    if not isinstance(spec, str):
        raise ReplicationConfigError(
            f"replication spec must be a string, got {type(spec).__name__}"
        )
    name, *args = spec.strip().lower().split(":")
    arity = {"pairwise": 0, "ring": 1, "clique": 2}.get(name)
    if arity is None:
        raise ReplicationConfigError(
            f"unknown replication strategy {name!r} in spec {spec!r}; use {_SPEC_FORMS}"
        )
    if len(args) != arity or not all(_UINT_RE.fullmatch(a) for a in args):
        raise ReplicationConfigError(
            f"malformed replication spec {spec!r}: {name!r} takes {arity} integer "
            f"argument(s) separated by ':'; use {_SPEC_FORMS}"
        )
    values = [int(a) for a in args]
    if name == "pairwise":
        return PairwiseReplicationStrategy()
    if name == "ring":
        return RingReplicationStrategy(values[0])
    return CliqueReplicationStrategy(replication_factor=values[0], replication_jump=values[1])
