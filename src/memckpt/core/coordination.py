"""Collectives between ranks, and the pure decisions made from what ranks report.

Collectives are injected (``Collectives``), so the engine and the recovery plan
run without a process group in tests. ``TorchCollectives`` runs every collective
on a dedicated gloo group created with a timeout, so a dead rank turns into a
``CollectiveError`` instead of a hang.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from memckpt.errors import CollectiveError

__all__ = [
    "Collectives",
    "LocalCollectives",
    "RecoveryPlan",
    "TorchCollectives",
    "plan_recovery",
]

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class RecoveryPlan:
    """Which step to load and, for each rank, where its data comes from.

    ``sources[r]`` is the rank whose node holds rank r's object (r itself when its
    own node still has it); ``fetches`` lists (rank, source) pairs for data a rank
    must fetch from a peer.
    """

    step: int | None
    sources: Mapping[int, int] = field(default_factory=dict)
    skipped: Mapping[int, str] = field(default_factory=dict)

    @property
    def fetches(self) -> list[tuple[int, int]]:
        return [(r, s) for r, s in sorted(self.sources.items()) if s != r]


def plan_recovery(
    inventories: Sequence[Mapping[int, Sequence[int]]],
    world_size: int,
    *,
    allow_fetch: bool = False,
    step: int | None = None,
    exclude_steps: Sequence[int] = (),
) -> RecoveryPlan:
    """Pick the newest step whose every rank's object is held somewhere (pure).

    ``inventories[h]`` maps step -> source ranks whose objects rank h's node holds.
    Without ``allow_fetch`` each rank must hold its own object. With it, a missing
    object is fetched from a holder; sources are spread so that no holder serves
    more ranks than needed. ``skipped`` says why each newer step was passed over.
    """
    holders: dict[int, dict[int, list[int]]] = {}
    for h, inv in enumerate(inventories):
        for s, ranks in inv.items():
            for r in ranks:
                holders.setdefault(s, {}).setdefault(r, []).append(h)
    candidates = sorted(holders, reverse=True) if step is None else [step]
    skipped: dict[int, str] = {}
    for s in candidates:
        if s in exclude_steps:
            skipped[s] = "excluded (failed to load)"
            continue
        by_rank = holders.get(s, {})
        missing = [r for r in range(world_size) if r not in by_rank]
        if missing:
            skipped[s] = f"no live copy of rank(s) {missing}"
            continue
        if not allow_fetch:
            remote = [r for r in range(world_size) if r not in by_rank[r]]
            if remote:
                skipped[s] = f"rank(s) {remote} do not hold their own data and fetching is off"
                continue
        sources: dict[int, int] = {}
        load: dict[int, int] = {}
        for r in range(world_size):
            hs = by_rank[r]
            if r in hs:
                sources[r] = r
                continue
            # spread: least-loaded holder, ties broken by distance from r for determinism
            src = min(hs, key=lambda h: (load.get(h, 0), (h - r) % world_size))
            load[src] = load.get(src, 0) + 1
            sources[r] = src
        return RecoveryPlan(step=s, sources=sources, skipped=skipped)
    return RecoveryPlan(step=None, skipped=skipped)
