"""Object sources: one way to read any rank's object, from this node's tree or a peer's.

An ``ObjectSource`` is an open object with its header, index and non-tensor part
validated (``memckpt.storage.reader.read_sections``); ``read_all`` fills destination
buffers with tensor bytes and verifies every chunk. ``ObjectReader`` reads a local
file; ``memckpt.transport.client.RemoteObjectReader`` reads a peer's object over the
transfer service with ranged GETs. ``ObjectLocator`` picks where to read an object
from: this node when it holds a copy whose digest the manifest names, else the
peers that hold one, falling over to the next holder when a source fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from memckpt import ids
from memckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DataDamagedError,
    TransferError,
)
from memckpt.replication.replicator import Replicator
from memckpt.storage.format import ObjectHeader, ObjectIndex, TensorEntry
from memckpt.storage.inventory import Inventory
from memckpt.storage.reader import ObjectReader, TensorDamage
from memckpt.storage.store import CheckpointStore, object_digest

__all__ = ["ObjectLocator", "ObjectSource", "find_object_offline"]

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
    ``network`` reaches the other nodes' transfer services (any replication setting, or
    none); ``manifest_checksum`` names the step's manifest in damage marks.

    Data that fails its checksums is handled here once, for every API: when every
    holder's copy of an object is damaged the step is marked damaged in this node's
    tree, so every rank's and every later restart's plan passes over it. Damaged copies
    on this node are listed in ``damaged_here``; ``set_aside_damaged`` moves them once no
    rank reads them any more (after the load's vote).
    """

    def __init__(
        self,
        store: CheckpointStore,
        network: Replicator | None,
        inventories: Sequence[Inventory],
        step: int,
        digests: Mapping[int, int],
        manifest_checksum: int | None = None,
    ) -> None:
        self.store = store
        self.network = network
        self.inventories = inventories
        self.step = step
        self.digests = digests
        self.manifest_checksum = manifest_checksum
        self.damaged: list[str] = []  # copies whose data failed verification
        self.damaged_here: set[int] = set()  # ranks whose copy on this node failed

    def set_aside_damaged(self) -> None:
        """Rename this node's damaged copies aside (call when no rank reads them any more)."""
        for rank in sorted(self.damaged_here):
            if rank in self.digests:
                self.store.set_aside_damaged(self.step, rank, self.digests[rank])
        self.damaged_here.clear()

    def is_local(self, rank: int) -> bool:
        """Whether this node's tree holds ``rank``'s object with the manifest's digest."""
        try:
            found = object_digest(self.store.object_path(self.step, rank))
        except CorruptCheckpointError:
            return False
        return found is not None and found[1] == self.digests.get(rank)

    def _node_of(self, rank: int) -> object:
        """A key for ``rank``'s node: ranks of this node share this node's one tree."""
        if self.network is None:  # no transfer service: every rank is on this node
            return "here"
        node_of = self.network.topology.node_of
        return node_of[rank] if rank < len(node_of) else ("rank", rank)

    def holders(self, rank: int, first: int | None = None) -> list[int]:
        """One rank per other node that holds ``rank``'s object, ``first``'s node first.

        Ranks on this node are left out (their copy is this node's, read locally), and
        each other node counts once (its ranks report the same tree), so every candidate
        is a distinct copy.
        """
        want = self.digests.get(rank)
        here = self._node_of(self.store.rank)
        order = [first] if first is not None else []
        order += [h for h in range(len(self.inventories)) if h != first]
        out: list[int] = []
        seen: set[object] = {here}
        for h in order:
            if h >= len(self.inventories):
                continue
            held = self.inventories[h].get(self.step)
            node = self._node_of(h)
            if held is None or held.objects.get(rank) != want or node in seen:
                continue
            seen.add(node)
            out.append(h)
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
        if self.network is None:
            raise TransferError(f"rank {rank}'s object of step {self.step} is on another node "
                                "and this job has no transfer service (one node)")  # fmt: skip
        return self.network.open_remote(self.step, rank, holder)

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
        damaged = 0
        for holder in candidates:
            try:
                with self.open(rank, holder) as src:
                    return fn(src), holder
            except (TransferError, CorruptCheckpointError) as e:
                last = e
                where = "this node" if holder is None else f"rank {holder}"
                log.warning("rank %d: reading rank %d's object of step %d from %s failed: %s",
                            self.store.rank, rank, self.step, where, e)  # fmt: skip
                if isinstance(e, DataDamagedError):
                    damaged += 1
                    self.damaged.append(f"rank {rank}'s object on {where}: {e}")
                    if holder is None:
                        self.damaged_here.add(rank)
        assert last is not None
        if damaged == len(candidates) and self.manifest_checksum is not None:
            self.store.mark_damaged(self.step, self.manifest_checksum, str(last))
            log.error("rank %d: every copy of rank %d's object of step %d is damaged; step %d "
                      "is marked damaged and loads pass over it", self.store.rank, rank,
                      self.step, self.step)  # fmt: skip
        raise last


def find_object_offline(
    layouts: Sequence[ids.JobLayout], step: int, rank: int, digest: int
) -> Path:
    """The offline locator: ``rank``'s object of ``step`` in the first of several node trees
    (base directories read from this machine, no peers) whose header digest is ``digest``.

    For tools that read every node's tree from one place (``memckpt export --from``).
    CheckpointNotFoundError names the trees searched.
    """
    for lay in layouts:
        path = lay.object_path(step, rank)
        try:
            found = object_digest(path)
        except CorruptCheckpointError as e:
            log.warning("skipping %s: %s", path, e)
            continue
        if found is not None and found[1] == digest:
            return path
    raise CheckpointNotFoundError(
        f"rank {rank}'s object of step {step} is not in {[str(lay.root) for lay in layouts]}; "
        "pass every node's base directory (memckpt export ... --from NODE_DIR)"
    )
