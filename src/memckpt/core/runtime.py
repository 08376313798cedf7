"""The node runtime: one per process and job, shared by every saver and loader in it.

It holds the job's store and buffer pool, the collectives (two gloo groups: one for
the caller's thread, one for the background votes), the replicator (transfer server,
client, peer table, plan) and the save engine. ``NodeRuntime.acquire`` is collective
the first time a job is opened in a process (groups are created, servers bound,
addresses exchanged); later acquires of the same job return the same runtime with no
collective, no new group and no new server. ``release`` closes it with the last user.

A job opened twice with different settings (replication, keep_last, ...) is refused
with an error naming both, rather than silently using either.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memckpt.core.coordination import (
    Collectives,
    Inventory,
    LocalCollectives,
    RecoveryPlan,
    TorchCollectives,
)
from memckpt.core.engine import SaveEngine
from memckpt.core.format import DEFAULT_CHUNK_SIZE
from memckpt.core.manifest import StepManifest
from memckpt.core.store import CheckpointStore
from memckpt.core.transaction import Vote
from memckpt.errors import CheckpointNotFoundError, MemckptError

if TYPE_CHECKING:
    from memckpt.replication.replicator import Replicator
    from memckpt.replication.strategies import ReplicationStrategy

__all__ = ["NodeRuntime", "RuntimeOptions"]

log = logging.getLogger(__name__)


def _dist_world() -> int | None:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return None


@dataclass(frozen=True)
class RuntimeOptions:
    """Settings that must agree between every user of one job's runtime in a process."""

    keep_last: int = 2
    limit_bytes: int | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    durable: bool = False
    prefault: bool = True
    replication: str | None = None
    node_id: str | None = None
    connections: int = 2
    transfer_timeout_s: float = 30.0
    timeout_s: float = 300.0
    size_hint: int | None = None
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False)


class NodeRuntime:
    """See the module docstring. Build with :meth:`acquire`, give back with :meth:`release`."""

    _lock = threading.Lock()
    _open: dict[tuple[str, str], NodeRuntime] = {}

    def __init__(
        self,
        store: CheckpointStore,
        coll: Collectives,
        commit_coll: Collectives,
        replicator: Replicator | None,
        engine: SaveEngine,
        options: RuntimeOptions,
        key: tuple[str, str],
    ) -> None:
        self.store = store
        self.coll = coll
        self.commit_coll = commit_coll
        self.replicator = replicator
        self.engine = engine
        self.options = options
        self._key = key
        self._users = 0

    @property
    def rank(self) -> int:
        return self.coll.rank

    @property
    def world_size(self) -> int:
        return self.coll.world_size

    @classmethod
    def acquire(
        cls,
        base_dir: str | os.PathLike[str],
        job_id: str,
        options: RuntimeOptions | None = None,
        *,
        collectives: Collectives | None = None,
        commit_collectives: Collectives | None = None,
        strategy: str | ReplicationStrategy | None = None,
        transfer_host: str | None = None,
        transfer_port: int | None = None,
        secret: bytes | None = None,
        vote: Vote | None = None,
    ) -> NodeRuntime:
        """The job's runtime in this process; opens it (collectively) the first time."""
        options = options or RuntimeOptions()
        key = (os.path.realpath(base_dir), str(job_id))
        with cls._lock:
            rt = cls._open.get(key)
            if rt is not None:
                if rt.options != options:
                    raise MemckptError(
                        f"job {job_id!r} under {base_dir} is already open in this process with "
                        f"{rt.options}; this call asks for {options}. Pass the same settings, "
                        "or close the other manager or writer first"
                    )
                rt._users += 1
                return rt
        rt = cls._open_new(base_dir, job_id, options, key, collectives, commit_collectives,
                           strategy, transfer_host, transfer_port, secret, vote)  # fmt: skip
        with cls._lock:
            cls._open[key] = rt
            rt._users += 1
        return rt

    @classmethod
    def _open_new(
        cls,
        base_dir: str | os.PathLike[str],
        job_id: str,
        options: RuntimeOptions,
        key: tuple[str, str],
        collectives: Collectives | None,
        commit_collectives: Collectives | None,
        strategy: str | ReplicationStrategy | None,
        transfer_host: str | None,
        transfer_port: int | None,
        secret: bytes | None,
        vote: Vote | None,
    ) -> NodeRuntime:
        if collectives is None:
            world = _dist_world()
            if world is not None and world > 1:
                collectives = TorchCollectives(options.timeout_s)
                commit_collectives = commit_collectives or TorchCollectives(options.timeout_s)
            else:
                collectives = LocalCollectives()
        commit_coll = commit_collectives or collectives
        store = CheckpointStore(base_dir, job_id, collectives.rank, options.limit_bytes)
        # before any collective: no rank saves before every rank has settled its tree
        store.remove_stale_markers()
        store.settle_interrupted_resaves()
        replicator = None
        try:
            spec = strategy if strategy is not None else options.replication
            if spec is not None:
                from memckpt.replication.replicator import Replicator

                replicator = Replicator.setup(
                    store,
                    collectives,
                    spec,
                    node_id=options.node_id,
                    host=transfer_host,
                    port=transfer_port,
                    secret=secret,
                    connections=options.connections,
                    timeout_s=options.transfer_timeout_s,
                )
                if replicator is not None:
                    replicator.write_peer_file(collectives.world_size)
            engine = SaveEngine(
                store,
                commit_coll,
                keep_last=options.keep_last,
                chunk_size=options.chunk_size,
                durable=options.durable,
                prefault=options.prefault,
                replicator=replicator,
                vote=vote,
            )
        except BaseException:
            if replicator is not None:
                replicator.close()
            store.close()
            raise
        rt = cls(store, collectives, commit_coll, replicator, engine, options, key)
        if options.prefault:
            rt._prefault_at_start(options.size_hint)
        return rt

    def _prefault_at_start(self, size_hint: int | None) -> None:
        """Warm the first save: pre-fault a buffer the size of the newest object here."""
        size = size_hint or self.store.newest_object_size()
        if not size:
            return
        self.store.pool.prefault_in_background(size)

    @property
    def root(self) -> Path:
        return self.store.root

    @classmethod
    def find(cls, base_dir: str | os.PathLike[str], job_id: str) -> NodeRuntime | None:
        """The job's open runtime in this process, taking one more use of it; or None."""
        key = (os.path.realpath(base_dir), str(job_id))
        with cls._lock:
            rt = cls._open.get(key)
            if rt is not None:
                rt._users += 1
            return rt

    def exchange_inventories(self) -> list[Inventory]:
        """Every rank's inventory, indexed by rank (collective; waits for the save in flight)."""
        self.engine.wait_idle()
        return self.coll.all_gather_object(self.store.inventory(), "inventory exchange")

    def ensure_manifest(self, plan: RecoveryPlan) -> StepManifest:
        """The plan's manifest, written into this node's tree if it lacked it (collective).

        Ranks whose node lacks it (a replaced node) get it from the first rank whose node
        has it; every rank takes part in the exchange.
        """
        step = plan.step
        assert step is not None and plan.manifest is not None
        mine = self.store.manifest(step)
        need = mine is None or mine.checksum != plan.manifest.checksum
        needs = self.coll.all_gather_object(need, f"manifest check for step {step}")
        if any(needs):
            giver = plan.manifest_holders[0] if plan.manifest_holders else None
            offer = mine if self.rank == giver and not need else None
            got = self.coll.all_gather_object(offer, f"manifest exchange for step {step}")
            m = got[giver] if giver is not None else None
            if need:
                if m is None:
                    raise CheckpointNotFoundError(
                        f"rank {self.rank}: no live node could share the manifest of step {step}"
                    )
                self.store.write_manifest(m)
                mine = m
        assert mine is not None
        return mine

    def release(self) -> None:
        """Give back one use; the last one waits for the save in flight and closes everything."""
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            self._open.pop(self._key, None)
        self.engine.close()
        if self.replicator is not None:
            self.replicator.close()
        self.store.close()
