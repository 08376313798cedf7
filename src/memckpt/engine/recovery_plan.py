"""The pure recovery plan: which step to load and where each rank's data comes from.

Inventories in (what each rank's node holds), plan out; no I/O, so tests drive it
without processes and ``memckpt status`` renders it for operators.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from memckpt.errors import ConfigError
from memckpt.storage.inventory import Inventory, ManifestInfo, StepHoldings

__all__ = ["NON_FINITE_POLICIES", "RecoveryPlan", "check_on_non_finite", "plan_recovery"]

NON_FINITE_POLICIES = ("skip", "load", "raise")
NON_FINITE_REASON = "saved holding NaN/Inf"


def check_on_non_finite(value: object) -> str:
    """``value`` if it is a policy for steps saved holding NaN/Inf, else ConfigError."""
    if value not in NON_FINITE_POLICIES:
        raise ConfigError(f"on_non_finite must be one of {NON_FINITE_POLICIES}, got {value!r}")
    return value  # type: ignore[return-value]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryPlan:
    """Which step to load and, for each rank, where its data comes from.

    ``sources[r]`` is the rank whose node holds rank r's object (r itself when its
    own node still has it); ``fetches`` lists (rank, source) pairs for data a rank
    must fetch from a peer. ``manifest`` is the chosen step's manifest and
    ``manifest_holders`` the ranks whose node has it. ``world_size_mismatch`` is
    (step, saved world size) when the newest complete step was saved by another
    world size and the plan was asked to stop there rather than skip it.
    """

    step: int | None
    sources: Mapping[int, int] = field(default_factory=dict)
    skipped: Mapping[int, str] = field(default_factory=dict)
    manifest: ManifestInfo | None = None
    manifest_holders: tuple[int, ...] = ()
    world_size_mismatch: tuple[int, int] | None = None
    non_finite: tuple[int, str] | None = None  # (step, which tensors) under "raise"

    @property
    def fetches(self) -> list[tuple[int, int]]:
        return [(r, s) for r, s in sorted(self.sources.items()) if s != r]


def _spread_sources(by_rank: Mapping[int, Sequence[int]], world_size: int) -> dict[int, int]:
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
    return sources


def plan_recovery(
    inventories: Sequence[Inventory],
    world_size: int,
    *,
    allow_fetch: bool = False,
    step: int | None = None,
    exclude_steps: Sequence[int] = (),
    on_world_size_mismatch: str = "raise",
    newer_than: int | None = None,
    on_non_finite: str = "skip",
) -> RecoveryPlan:
    """Pick the newest complete step and a source for every rank's object (pure).

    ``inventories[h]`` is what rank h's node holds. A step is complete when some node
    has its manifest and, for every rank of the world that saved it, some node holds
    an object whose digest the manifest names. Without ``allow_fetch`` each rank must
    hold its own object. With it, a missing object is fetched from a holder; sources
    are spread so that no holder serves more ranks than needed.

    A complete step saved by another world size is never loaded: with
    ``on_world_size_mismatch="raise"`` the plan stops there (``step`` None,
    ``world_size_mismatch`` set); with ``"skip"`` older steps are considered; with
    ``"allow"`` (a resharding reader that reads any rank's object) it counts as
    complete, and ``sources`` covers the saved world's ranks.
    ``newer_than`` passes over steps at or below it (a tier policy's floor).
    ``skipped`` says why each newer step was passed over. A step some node marked
    damaged (a load found its data failing verification on every holder) is passed over.

    A step saved holding NaN/Inf (its manifest says which ranks and tensors) is passed
    over with ``on_non_finite="skip"`` (the default) unless it is the ``step`` asked
    for; ``"load"`` loads it like any other; ``"raise"`` stops there (``step`` None,
    ``non_finite`` set).
    """
    check_on_non_finite(on_non_finite)
    if on_world_size_mismatch not in ("raise", "skip", "allow"):
        raise ConfigError(
            "on_world_size_mismatch must be 'raise', 'skip' or 'allow', "
            f"got {on_world_size_mismatch!r}"
        )
    steps = {s for inv in inventories for s in inv}
    candidates = sorted(steps, reverse=True) if step is None else [step]
    skipped: dict[int, str] = {}
    for s in candidates:
        if s in exclude_steps:
            skipped[s] = "excluded (failed to load)"
            continue
        if newer_than is not None and s <= newer_than:
            skipped[s] = f"not newer than step {newer_than} (another tier holds that)"
            continue
        held = [inv.get(s) or StepHoldings() for inv in inventories]
        variants = {h.manifest.checksum: h.manifest for h in held if h.manifest is not None}
        if not variants:
            skipped[s] = "not committed (no node has its step manifest)"
            continue
        reasons = []
        damaged = frozenset().union(*(h.damaged for h in held))
        for m in sorted(variants.values(), key=lambda m: -m.created_unix):
            if m.checksum in damaged:
                reasons.append(
                    "damaged: a load found its data failing verification on every holder"
                )
                continue
            by_rank = {
                r: [h for h, hold in enumerate(held) if hold.objects.get(r) == m.digests[r]]
                for r in range(m.world_size)
            }
            missing = [r for r, hs in by_rank.items() if not hs]
            if missing:
                reasons.append(f"no live copy of rank(s) {missing}")
                continue
            if m.non_finite_ranks and on_non_finite != "load":
                if on_non_finite == "raise":
                    return RecoveryPlan(None, skipped=skipped,
                                        non_finite=(s, m.non_finite_detail))  # fmt: skip
                if step is None:
                    reasons.append(f"{NON_FINITE_REASON} ({m.non_finite_detail})")
                    continue
            if m.world_size != world_size and on_world_size_mismatch != "allow":
                if on_world_size_mismatch == "raise":
                    return RecoveryPlan(
                        None, skipped=skipped, world_size_mismatch=(s, m.world_size)
                    )
                reasons.append(f"saved by {m.world_size} ranks, this job has {world_size}")
                continue
            if not allow_fetch and m.world_size == world_size:
                remote = [r for r in range(world_size) if r not in by_rank[r]]
                if remote:
                    reasons.append(
                        f"rank(s) {remote} do not hold their own data and fetching is off"
                    )
                    continue
            holders = tuple(h for h, hold in enumerate(held) if hold.manifest == m)
            return RecoveryPlan(s, _spread_sources(by_rank, m.world_size), skipped, m, holders)
        skipped[s] = "; ".join(reasons)
    return RecoveryPlan(step=None, skipped=skipped)
