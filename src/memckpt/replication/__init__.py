"""Peer replication: pure strategies (who holds whose data) and the replicator that moves it.

``memckpt.replication.strategies`` decides, without I/O; ``memckpt.replication.replicator``
acts on the decision through the transfer service (``memckpt.transport``).
"""

from __future__ import annotations

from memckpt.replication.strategies import (
    CliqueReplicationStrategy,
    NodeTopology,
    PairwiseReplicationStrategy,
    ReplicationConfigError,
    ReplicationPlan,
    ReplicationStrategy,
    RingReplicationStrategy,
    strategy_from_spec,
)

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
