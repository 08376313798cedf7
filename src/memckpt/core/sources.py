"""Object sources: one way to read any rank's object, from this node's tree or a peer's.

An ``ObjectSource`` is an open object with its header, index and non-tensor part
validated (``memckpt.core.reader.read_sections``); ``read_all`` fills destination
buffers with tensor bytes and verifies every chunk. ``ObjectReader`` reads a local
file; ``memckpt.transport.client.RemoteObjectReader`` reads a peer's object over the
transfer service with ranged GETs. ``ObjectLocator`` picks where to read an object
from: this node when it holds a copy whose digest the manifest names, else the
peers that hold one, falling over to the next holder when a source fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from memckpt.core.coordination import Inventory
from memckpt.core.format import ObjectHeader, ObjectIndex, TensorEntry
from memckpt.core.reader import ObjectReader, TensorDamage
from memckpt.core.store import CheckpointStore, object_digest
from memckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, TransferError

if TYPE_CHECKING:
    from memckpt.replication.replicator import Replicator

__all__ = ["ObjectLocator", "ObjectSource"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class ObjectSource(Protocol):
    """An open, validated object, local or remote (a context manager)."""

    where: str
    header: ObjectHeader
    index: ObjectIndex
    skeleton: bytes

    def read_all(
        self, targets: list[tuple[TensorEntry, memoryview]], threads: int
    ) -> list[TensorDamage]:
        """Fill each target with its tensor's bytes; return the chunks whose checksum failed."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


class ObjectLocator:
    """Finds and opens any rank's object of a step (see the module docstring).

    ``inventories`` are every rank's report (``CheckpointStore.inventory()``), indexed by
    rank, as exchanged for the recovery plan; ``digests`` maps rank -> the digest the
    step's manifest names (objects with another digest are not that step's data).
    """

    def __init__(
        self,
        store: CheckpointStore,
        replicator: Replicator | None,
        inventories: Sequence[Inventory],
        step: int,
        digests: Mapping[int, int],
    ) -> None:
        self.store = store
        self.replicator = replicator
        self.inventories = inventories
        self.step = step
        self.digests = digests

    def is_local(self, rank: int) -> bool:
        """Whether this node's tree holds ``rank``'s object with the manifest's digest."""
        try:
            found = object_digest(self.store.object_path(self.step, rank))
        except CorruptCheckpointError:
            return False
        return found is not None and found[1] == self.digests.get(rank)

    def holders(self, rank: int, first: int | None = None) -> list[int]:
        """Ranks whose nodes hold ``rank``'s object, ``first`` first, this rank excluded."""
        want = self.digests.get(rank)
        out = [
            h
            for h, inv in enumerate(self.inventories)
            if h != self.store.rank
            and (held := inv.get(self.step)) is not None
            and held.objects.get(rank) == want
        ]
        if first is not None and first in out:
            out.remove(first)
            out.insert(0, first)
        return out

    def open(self, rank: int, holder: int | None = None) -> ObjectSource:
        """Open ``rank``'s object here (``holder`` None) or on ``holder``'s node."""
        if holder is None:
            reader = ObjectReader(self.store.object_path(self.step, rank))
            if reader.header.digest != self.digests.get(rank):
                reader.close()
                raise CorruptCheckpointError(
                    f"{reader.where}: not the object the manifest of step {self.step} names"
                )
            return reader
        if self.replicator is None:
            raise TransferError(f"rank {rank}'s object of step {self.step} is on another node "
                                "and replication is off")  # fmt: skip
        return self.replicator.open_remote(self.step, rank, holder)

    def read(
        self, rank: int, fn: Callable[[ObjectSource], T], *, first: int | None = None
    ) -> tuple[T, int | None]:
        """Run ``fn`` on ``rank``'s object, local copy first, then each holder in turn.

        A source that fails (TransferError, CorruptCheckpointError) is logged and the
        next is tried; returns (``fn``'s result, the holder used or None for local).
        """
        candidates: list[int | None] = [None] if self.is_local(rank) else []
        candidates += self.holders(rank, first)
        if not candidates:
            raise CheckpointNotFoundError(
                f"no live node holds rank {rank}'s object of step {self.step}"
            )
        last: Exception | None = None
        for holder in candidates:
            try:
                with self.open(rank, holder) as src:
                    return fn(src), holder
            except (TransferError, CorruptCheckpointError) as e:
                last = e
                log.warning("rank %d: reading rank %d's object of step %d from %s failed: %s",
                            self.store.rank, rank, self.step,
                            "this node" if holder is None else f"rank {holder}", e)  # fmt: skip
        assert last is not None
        raise last
