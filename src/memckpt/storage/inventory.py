"""What a node holds of each step, as ranks report and exchange it (no I/O here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from memckpt.storage.manifest import StepManifest

__all__ = ["Inventory", "ManifestInfo", "StepHoldings"]


@dataclass(frozen=True)
class ManifestInfo:
    """A step manifest as ranks exchange it: enough to decide completeness, no blobs."""

    world_size: int
    digests: tuple[int, ...]
    checksum: int
    created_unix: float = 0.0
    non_finite_ranks: tuple[int, ...] = ()  # ranks that saved NaN/Inf
    non_finite_detail: str = ""  # which tensors, for the log line and ``status``

    @classmethod
    def of(cls, manifest: StepManifest) -> ManifestInfo:
        return cls(
            manifest.world_size,
            tuple(manifest.objects[r].digest for r in range(manifest.world_size)),
            manifest.checksum,
            manifest.created_unix,
            tuple(sorted(manifest.non_finite)),
            manifest.non_finite_summary(),
        )


@dataclass(frozen=True)
class StepHoldings:
    """What one node holds of one step: valid objects (rank -> digest) and its manifest.

    ``damaged`` holds the checksums of manifests of this step that a load on this node
    found damaged on every holder (their data failed verification): every rank and every
    restart then passes over them.
    """

    objects: Mapping[int, int] = field(default_factory=dict)
    manifest: ManifestInfo | None = None
    damaged: frozenset[int] = frozenset()


Inventory = Mapping[int, StepHoldings]
"""step -> holdings, as one rank reports its node's tree."""
