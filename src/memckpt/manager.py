"""CheckpointManager: the public entry point for memory checkpoints."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from memckpt.core import events
from memckpt.core.coordination import (
    Collectives,
    LocalCollectives,
    RecoveryPlan,
    TorchCollectives,
    plan_recovery,
)
from memckpt.core.engine import SaveEngine
from memckpt.core.format import DEFAULT_CHUNK_SIZE
from memckpt.core.handle import SaveHandle
from memckpt.core.reader import load_object
from memckpt.core.store import CheckpointStore
from memckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MemckptError,
    TransferError,
)
from memckpt.ids import validate_step
from memckpt.replication import ReplicationStrategy
from memckpt.replication.replicator import Replicator

__all__ = ["CheckpointManager", "LoadInfo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadInfo:
    """What the last ``load()`` did on this rank."""

    step: int
    path: str
    seconds: float
    fell_back_from: tuple[int, ...] = ()
    source_rank: int = -1
    sources: dict[int, int] | None = None
    fetched_bytes: int = 0
    fetch_s: float = 0.0

    @property
    def fetched(self) -> bool:
        """Whether this rank's data came from a peer's node."""
        return self.fetched_bytes > 0


def _dist_rank_world() -> tuple[int, int] | None:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


class CheckpointManager:
    """Memory-first checkpoints of one job, kept under ``base_dir/job_id`` on each node.

    Construct it on every rank after ``torch.distributed`` is initialised (or in a
    single process without it). Constructing it, ``latest()``, ``load()`` and
    ``close()`` are collective: every rank calls them in the same order. ``save()``
    is called by every rank for the same steps; its background commit vote is the
    collective part.

    Args:
        base_dir: node-local directory for checkpoints, ideally on a tmpfs (/dev/shm).
        job_id: names the job's subdirectory; letters, digits, ``_ - .``.
        keep_last: how many complete checkpoints to keep (>= 1).
        timeout_s: limit for every collective; a dead rank becomes an error after it.
        limit_bytes: cap on the bytes this rank's buffers may take (default: free space).
        durable: fsync object files (for base dirs on disks, not needed on tmpfs).
        collectives, commit_collectives: injected collectives for the caller's thread and
            the background commit vote (default: gloo groups, or a world of one).
        replication: keep copies of each rank's data on peer nodes: a strategy spec
            (``"pairwise"``, ``"ring:K"``, ``"clique:F:J"``) or a ReplicationStrategy;
            None keeps data on its own node only. Every rank passes the same value.
        node_id: this rank's failure domain (default: ``MEMCKPT_NODE_ID``, else the
            hostname, plus torchrun's node rank).
        transfer_host, transfer_port: where this rank's transfer server listens
            (default: ``MEMCKPT_TRANSFER_HOST`` / the interface that reaches MASTER_ADDR /
            127.0.0.1, and a free port or ``MEMCKPT_TRANSFER_PORT`` + local rank).
        secret: job secret for peer authentication (default: ``MEMCKPT_SECRET``, else
            generated on rank 0 and shared through the process group).
        connections: parallel connections per object transfer.
        transfer_timeout_s: limit for each socket operation of a transfer.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        job_id: str,
        keep_last: int = 2,
        *,
        timeout_s: float = 300.0,
        limit_bytes: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        durable: bool = False,
        prefault: bool = True,
        collectives: Collectives | None = None,
        commit_collectives: Collectives | None = None,
        replication: str | ReplicationStrategy | None = None,
        node_id: str | None = None,
        transfer_host: str | None = None,
        transfer_port: int | None = None,
        secret: bytes | None = None,
        connections: int = 2,
        transfer_timeout_s: float = 30.0,
    ) -> None:
        if collectives is None:
            dist_info = _dist_rank_world()
            if dist_info is not None and dist_info[1] > 1:
                collectives = TorchCollectives(timeout_s)
                commit_collectives = commit_collectives or TorchCollectives(timeout_s)
            else:
                collectives = LocalCollectives()
        self.coll = collectives
        self.commit_coll = commit_collectives or collectives
        self.rank = collectives.rank
        self.world_size = collectives.world_size
        self.store = CheckpointStore(base_dir, job_id, self.rank, limit_bytes)
        self.store.remove_stale_markers()
        self.replicator: Replicator | None = None
        if replication is not None:
            self.replicator = Replicator.setup(
                self.store,
                collectives,
                replication,
                node_id=node_id,
                host=transfer_host,
                port=transfer_port,
                secret=secret,
                connections=connections,
                timeout_s=transfer_timeout_s,
            )
            if self.replicator is not None:
                self._write_peer_file()
        self.engine = SaveEngine(
            self.store,
            self.commit_coll,
            keep_last=keep_last,
            chunk_size=chunk_size,
            durable=durable,
            prefault=prefault,
            replicator=self.replicator,
        )
        self.last_load: LoadInfo | None = None
        self._inventories: list[Any] = []
        self._closed = False

    @property
    def job_id(self) -> str:
        return self.store.job_id

    @property
    def root(self) -> str:
        return str(self.store.root)

    def _write_peer_file(self) -> None:
        """Record this rank's node, address and replication plan for ``memckpt status``."""
        rep = self.replicator
        assert rep is not None
        d = self.store.root / ".peers"
        d.mkdir(exist_ok=True)
        doc = {
            "rank": self.rank,
            "world_size": self.world_size,
            "node_id": rep.peers[self.rank].node_id,
            "address": rep.server.address,
            "strategy": rep.strategy.spec,
            "node_of": list(rep.topology.node_of),
            "node_ids": [p.node_id for p in rep.peers],
            "holders": {str(r): list(rep.plan.holders_of(r)) for r in range(self.world_size)},
            "time": time.time(),
        }
        tmp = d / f".rank-{self.rank}.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, d / f"rank-{self.rank}.json")

    def save(self, step: int, state_dict: Any, *, blocking: bool = False) -> SaveHandle:
        """Checkpoint ``state_dict`` as ``step``; returns once its tensors are copied.

        The caller may change its tensors as soon as this returns. The rest (hashing,
        commit, vote, retention) runs in the background; ``handle.wait()`` returns the
        SaveResult or raises the error. With ``blocking=True`` it returns committed.
        A full filesystem fails the handle, not training; the previous checkpoint stays.
        """
        return self.engine.save(step, state_dict, blocking=blocking)

    def wait(self) -> None:
        """Wait for the save in flight (if any) to finish."""
        self.engine.wait_idle()

    def _plan(self, step: int | None, exclude: Iterable[int] = ()) -> RecoveryPlan:
        self.engine.wait_idle()
        self._inventories = self.coll.all_gather_object(
            self.store.inventory(), "inventory exchange"
        )
        return plan_recovery(
            self._inventories,
            self.world_size,
            allow_fetch=self.replicator is not None,
            step=step,
            exclude_steps=tuple(exclude),
        )

    def latest(self) -> int | None:
        """The newest step whose every rank's data exists, valid, on a live rank, or None.

        Collective. Without replication each rank must hold its own data; with it a
        copy on any peer counts (``load`` fetches it). Decided from the inventories the
        ranks exchange, so it answers in one round trip even when nothing survives.
        """
        return self._plan(None).step

    def recovery_plan(self, step: int | None = None) -> RecoveryPlan:
        """Which step ``load`` would take and where each rank's data would come from."""
        return self._plan(step)

    def load(
        self,
        step: int | None = None,
        state_dict: Any = None,
        *,
        map_location: Any = None,
        strict: bool = True,
        safe_globals: Iterable[Any] = (),
    ) -> Any:
        """Load a checkpoint (collective). Returns the state dict, or None if none exists.

        Without ``step`` the newest complete step is loaded; if a rank finds it damaged,
        every rank falls back to the next older complete step. With ``state_dict``,
        tensors are copied into it in place after checking every key's shape and dtype
        (a mismatch raises before anything is written) and its non-tensor values are
        updated. ``safe_globals`` lists classes the non-tensor part may construct.
        """
        if step is not None:
            step = validate_step(step)
        excluded: list[int] = []
        while True:
            t0 = time.perf_counter()
            plan = self._plan(step, excluded)
            if plan.step is None:
                if step is not None:
                    why = plan.skipped.get(step, "no rank holds it")
                    raise CheckpointNotFoundError(
                        f"step {step} of job {self.job_id!r} cannot be loaded: {why}"
                    )
                log.info("rank %d: no complete memory checkpoint of job %s", self.rank, self.job_id)
                return None
            path = self.store.object_path(plan.step, self.rank)
            error: BaseException | None = None
            result = None
            source = plan.sources[self.rank]
            fetched, fetch_s = 0, 0.0
            try:
                if source == self.rank:
                    result = load_object(path, state_dict, map_location=map_location,
                                         strict=strict, safe_globals=safe_globals)  # fmt: skip
                else:
                    t_fetch = time.perf_counter()
                    source, fetched, result = self._load_remote(
                        plan.step, source, state_dict, map_location, strict, safe_globals
                    )
                    fetch_s = time.perf_counter() - t_fetch
            except MemckptError as e:
                error = e
            votes = self.coll.all_gather_object(
                (error is None, type(error).__name__, str(error) if error else ""),
                f"load vote for step {plan.step}",
            )
            failed = [(r, kind, msg) for r, (ok, kind, msg) in enumerate(votes) if not ok]
            if not failed:
                self.last_load = LoadInfo(
                    plan.step,
                    str(path),
                    time.perf_counter() - t0,
                    tuple(excluded),
                    source_rank=source,
                    sources={**plan.sources, self.rank: source},
                    fetched_bytes=fetched,
                    fetch_s=fetch_s,
                )
                log.info("rank %d: loaded step %d from %s%s", self.rank, plan.step, path,
                         f" (fetched from rank {source})" if fetched else "")  # fmt: skip
                events.emit("loaded", step=plan.step, rank=self.rank, source=source)
                self._after_load(plan.step, fetch_from=source if fetched else None)
                return result
            retryable = (CorruptCheckpointError.__name__, TransferError.__name__)
            corrupt_only = all(kind in retryable for _, kind, _ in failed)
            if step is None and corrupt_only:
                log.warning(
                    "rank %d: step %d is damaged (%s); trying an older one",
                    self.rank,
                    plan.step,
                    "; ".join(f"rank {r}: {m}" for r, _, m in failed),
                )
                excluded.append(plan.step)
                continue
            if error is not None:
                raise error
            r, kind, msg = failed[0]
            raise MemckptError(f"step {plan.step} failed to load on rank {r}: {kind}: {msg}")

    def _load_remote(
        self,
        step: int,
        source: int,
        state_dict: Any,
        map_location: Any,
        strict: bool,
        safe_globals: Iterable[Any],
    ) -> tuple[int, int, Any]:
        """This node lost its copy: stream it from a peer straight into the destination
        tensors, verifying every chunk on arrival. The planned source first, then every
        other holder; returns (source used, bytes received, loaded state)."""
        rep = self.replicator
        assert rep is not None
        others = [
            h
            for h, inv in enumerate(self._inventories)
            if h not in (source, self.rank) and self.rank in inv.get(step, ())
        ]
        for i, src in enumerate([source, *others]):
            try:
                with rep.open_remote(step, self.rank, src) as remote:
                    result = load_object(remote, state_dict, map_location=map_location,
                                         strict=strict, safe_globals=safe_globals)  # fmt: skip
                return src, remote.bytes_received, result
            except (TransferError, CorruptCheckpointError) as e:
                if i == len(others):
                    raise
                log.warning("rank %d: step %d from rank %d failed (%s); trying rank %d",
                            self.rank, step, src, e, others[i])  # fmt: skip
        raise AssertionError("unreachable")  # pragma: no cover

    def _after_load(self, step: int, fetch_from: int | None = None) -> None:
        """The loaded step is the job's again: mark it, and restore every copy of it.

        In the background: a rank that streamed its data from a peer also keeps a local
        copy again (so a second failure before the next save still finds it here), and
        every rank pushes its object to holder nodes that lost theirs.
        """
        if not self.store.is_committed(step):
            self.store.mark_committed(step, self.world_size)
        rep = self.replicator
        self.engine.note_loaded(step, replicated=False)
        if rep is not None:
            invs = self._inventories

            def rereplicate() -> None:
                if fetch_from is not None:
                    try:
                        rep.fetch(step, self.rank, fetch_from)
                    except MemckptError as e:
                        log.warning("rank %d: no local copy of step %d: %s", self.rank, step, e)
                outcome = rep.rereplicate(step, invs)
                if outcome.ok and outcome.holders:
                    log.info("rank %d: step %d replicated again to ranks %s (%.1f MB, %.3fs)",
                             self.rank, step, outcome.holders, outcome.nbytes / 1e6,
                             outcome.seconds)  # fmt: skip

            self.engine.submit_background(rereplicate)

    def close(self) -> None:
        """Wait for the save in flight, stop the background worker and the transfer server."""
        if self._closed:
            return
        self._closed = True
        self.engine.close()
        if self.replicator is not None:
            self.replicator.close()
        self.store.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
