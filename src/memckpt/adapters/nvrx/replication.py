"""NVRx's clique replication, mapped onto memckpt's ``clique:F:J`` strategy.

The cliques are NVRx's (ranks ``b, b+J, b+2J, ...`` cut into groups of ``F``), but the
copies move through memckpt's transfer service in the background of a save, not through
torch.distributed collectives on the training thread, so no process groups are created.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from memckpt.errors import ReplicationConfigError
from memckpt.replication import CliqueReplicationStrategy as _Clique
from memckpt.replication.replicator import default_node_id

__all__ = ["CliqueReplicationStrategy", "LazyCliqueReplicationStrategy", "default_replication_jump"]

log = logging.getLogger(__name__)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_replication_jump() -> int:
    """Ranks per node: NVRx's default jump (the GPUs per node), also without GPUs.

    NVRx uses ``torch.cuda.device_count()``, which is 0 on a machine without GPUs. Here:
    the CUDA device count when there is one, else ``LOCAL_WORLD_SIZE`` (torchrun), else
    the number of ranks that share this rank's node id (``MEMCKPT_NODE_ID`` or the
    hostname), counted over the default process group (collective then).
    """
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.cuda.device_count()
    lws = os.environ.get("LOCAL_WORLD_SIZE", "")
    if lws.isdigit() and int(lws) > 0:
        return int(lws)
    rank, world = _world()
    if world == 1:
        return 1
    import torch.distributed as dist

    ids: list[str | None] = [None] * world
    dist.all_gather_object(ids, default_node_id(rank))
    counts: dict[str | None, int] = {}
    for node in ids:
        counts[node] = counts.get(node, 0) + 1
    sizes = set(counts.values())
    if len(sizes) != 1:
        raise ReplicationConfigError(
            f"nodes hold different numbers of ranks ({counts}); pass replication_jump explicitly"
        )
    return sizes.pop()


@dataclass(frozen=True)
class CliqueReplicationStrategy(_Clique):
    """Clique replication as in NVRx: every rank's data copied to the others of its clique.

    Build it with :meth:`from_replication_params` (as with NVRx) or directly with
    ``CliqueReplicationStrategy(replication_factor=F, replication_jump=J)``. NVRx's
    constructor takes a process group; this one does not (no groups are needed).
    """

    def __post_init__(self) -> None:
        for name in ("replication_factor", "replication_jump"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ReplicationConfigError(
                    f"CliqueReplicationStrategy({name}={value!r}): memckpt's clique strategy "
                    "takes integers, not a process group (replication runs over memckpt's "
                    "transfer service). Use CliqueReplicationStrategy.from_replication_params("
                    "replication_jump, replication_factor)"
                )
        super().__post_init__()

    @classmethod
    def from_replication_params(
        cls,
        replication_jump: int | None = None,
        replication_factor: int = 2,
        *,
        world_size: int | None = None,
    ) -> CliqueReplicationStrategy:
        """The cliques of NVRx's ``from_replication_params``, checked against the world size.

        ``replication_jump`` defaults to the ranks per node (see
        :func:`default_replication_jump`). A jump and factor that do not divide the world
        size (default: torch.distributed's) raise ReplicationConfigError here, not at the
        first save. Collective only when the default jump counts ranks per node.
        """
        jump = default_replication_jump() if replication_jump is None else replication_jump
        strategy = cls(replication_factor=replication_factor, replication_jump=jump)
        world = world_size if world_size is not None else _world()[1]
        strategy.cliques(world)  # raises on a jump or factor that does not fit
        if replication_factor == 1:
            log.warning("clique replication with replication_factor=1 keeps no copies")
        return strategy


class LazyCliqueReplicationStrategy:
    """NVRx's lazy clique strategy: parameters now, the strategy when the manager opens."""

    def __init__(self, replication_jump: int | None = None, replication_factor: int = 2) -> None:
        self.replication_jump = replication_jump
        self.replication_factor = replication_factor
        self._strategy: CliqueReplicationStrategy | None = None

    @property
    def replication_strategy(self) -> CliqueReplicationStrategy:
        """The built strategy (collective the first time when the jump is defaulted)."""
        if self._strategy is None:
            self._strategy = CliqueReplicationStrategy.from_replication_params(
                self.replication_jump, self.replication_factor
            )
        return self._strategy
