"""Collectives between ranks, injected so every layer runs without a process group in tests.

``TorchCollectives`` runs every collective on a dedicated gloo group created with a
timeout, so a dead rank turns into a ``CollectiveError`` instead of a hang. This sits
below every other layer: the replicator (secret and address exchange) and the engine
(votes, inventories) both speak it.
"""

from __future__ import annotations

import datetime
from typing import Any, Protocol

from memckpt.errors import CollectiveError

__all__ = ["Collectives", "LocalCollectives", "TorchCollectives"]


class Collectives(Protocol):
    """What memckpt needs from a process group. All ranks call each method in the same order."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj``, indexed by rank; ``what`` names the operation in errors."""
        ...


class LocalCollectives:
    """A world of one process: no process group needed."""

    rank = 0
    world_size = 1

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        return [obj]


class TorchCollectives:
    """Collectives on a new gloo group of the default process group, with a timeout.

    Creating one is itself collective: every rank must construct it in the same order.
    """

    def __init__(self, timeout_s: float = 300.0) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise CollectiveError("torch.distributed is not initialised; call init_process_group")
        self._dist = dist
        self.timeout_s = timeout_s
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self._rank = dist.get_rank()
        self._world_size = dist.get_world_size()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        out: list[Any] = [None] * self._world_size
        try:
            self._dist.all_gather_object(out, obj, group=self.group)
        except Exception as e:
            raise CollectiveError(
                f"rank {self._rank}: {what} failed after waiting up to {self.timeout_s:.0f}s for "
                f"the other {self._world_size - 1} ranks ({e}); a rank may have died or stopped "
                "calling the same memckpt operation"
            ) from e
        return out
