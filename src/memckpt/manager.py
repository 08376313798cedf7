"""CheckpointManager: the public entry point for memory checkpoints."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memckpt.core import events
from memckpt.core.coordination import Collectives, Inventory, RecoveryPlan, plan_recovery
from memckpt.core.drain import drain_objects, schedule_drain
from memckpt.core.format import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE
from memckpt.core.handle import SaveHandle
from memckpt.core.reader import load_object
from memckpt.core.runtime import NodeRuntime, RuntimeOptions
from memckpt.core.sources import ObjectLocator, ObjectSource
from memckpt.core.transaction import Vote
from memckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MemckptError,
    StateModifiedError,
    TransferError,
    WorldSizeMismatchError,
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
        size_hint: bytes of one rank's checkpoint, if known: a buffer this size is
            pre-faulted in the background at start so the first save is warm (default:
            the size of the newest object this rank finds on its node).
        persist_every, persist_dir: drain every K-th committed step in the background to
            ``persist_dir`` (a disk or shared filesystem), as a memckpt tree that
            ``CheckpointManager(persist_dir, job_id)`` loads; retention keeps a step
            until its drain ends.
        vote: how a step's completion is decided (default: an all-gather of every rank's
            ballot on a gloo group); see ``memckpt.core.transaction``.

    Managers (and other savers) of the same job in one process share one node runtime
    (``memckpt.core.runtime``): one store, buffer pool, transfer server and process group.
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
        size_hint: int | None = None,
        vote: Vote | None = None,
        persist_every: int | None = None,
        persist_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in (0, {MAX_CHUNK_SIZE}], got {chunk_size}")
        if persist_every is not None and (persist_every < 1 or persist_dir is None):
            raise ValueError("persist_every needs a value >= 1 and a persist_dir")
        spec = replication.spec if isinstance(replication, ReplicationStrategy) else replication
        options = RuntimeOptions(
            keep_last=keep_last,
            limit_bytes=limit_bytes,
            chunk_size=chunk_size,
            durable=durable,
            prefault=prefault,
            replication=spec,
            node_id=node_id,
            connections=connections,
            transfer_timeout_s=transfer_timeout_s,
            timeout_s=timeout_s,
            size_hint=size_hint,
        )
        self.runtime = NodeRuntime.acquire(
            base_dir,
            job_id,
            options,
            collectives=collectives,
            commit_collectives=commit_collectives,
            strategy=replication,
            transfer_host=transfer_host,
            transfer_port=transfer_port,
            secret=secret,
            vote=vote,
        )
        rt = self.runtime
        self.coll = rt.coll
        self.commit_coll = rt.commit_coll
        self.rank = rt.rank
        self.world_size = rt.world_size
        self.store = rt.store
        self.replicator: Replicator | None = rt.replicator
        self.engine = rt.engine
        self.last_load: LoadInfo | None = None
        self._inventories: list[Inventory] = []
        self._closed = False
        self._drain_hook = None
        if persist_every is not None:
            self._drain_hook = self._drainer(persist_every, Path(persist_dir))  # type: ignore[arg-type]
            self.engine.after_commit.append(self._drain_hook)

    def _drainer(self, every: int, dest: Path) -> Callable[[int], None]:
        def hook(step: int) -> None:
            if step % every == 0:
                schedule_drain(
                    self.engine,
                    step,
                    lambda: drain_objects(self.store, step, dest, self.rank == 0),
                    str(dest),
                )

        return hook

    @property
    def job_id(self) -> str:
        return self.store.job_id

    @property
    def root(self) -> str:
        return str(self.store.root)

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

    def _plan(
        self, step: int | None, exclude: Iterable[int] = (), on_world_size_mismatch: str = "raise"
    ) -> RecoveryPlan:
        self._inventories = self.runtime.exchange_inventories()
        return plan_recovery(
            self._inventories,
            self.world_size,
            allow_fetch=self.replicator is not None,
            step=step,
            exclude_steps=tuple(exclude),
            on_world_size_mismatch=on_world_size_mismatch,
        )

    def _world_size_error(self, plan: RecoveryPlan) -> WorldSizeMismatchError:
        assert plan.world_size_mismatch is not None
        step, saved = plan.world_size_mismatch
        return WorldSizeMismatchError(
            f"step {step} of job {self.job_id!r} was saved by {saved} ranks; this job runs "
            f"{self.world_size}. A memory checkpoint loads only into the world size that "
            "saved it (loading a subset would drop other ranks' shards). To change the "
            "number of ranks, reshard through torch.distributed.checkpoint (the DCP "
            "adapter) or load your persistent checkpoint; to ignore such steps pass "
            "on_world_size_mismatch='skip'."
        )

    def latest(self, *, on_world_size_mismatch: str = "raise") -> int | None:
        """The newest complete step, or None (collective).

        Complete: its manifest exists on a live node and every rank's object it names
        exists, valid, on a live node (without replication: on the rank's own node).
        A newer complete step saved by another world size raises WorldSizeMismatchError
        (``on_world_size_mismatch="skip"`` passes over it instead). Decided from the
        inventories the ranks exchange, so it answers in one round trip even when
        nothing survives.
        """
        plan = self._plan(None, on_world_size_mismatch=on_world_size_mismatch)
        if plan.world_size_mismatch is not None:
            raise self._world_size_error(plan)
        return plan.step

    def recovery_plan(self, step: int | None = None) -> RecoveryPlan:
        """Which step ``load`` would take and where each rank's data would come from."""
        return self._plan(step, on_world_size_mismatch="skip")

    def load(
        self,
        step: int | None = None,
        state_dict: Any = None,
        *,
        map_location: Any = None,
        strict: bool = True,
        safe_globals: Iterable[Any] = (),
        on_world_size_mismatch: str = "raise",
    ) -> Any:
        """Load a checkpoint (collective). Returns the state dict, or None if none exists.

        Without ``step`` the newest complete step is loaded; if a rank finds it damaged,
        every rank falls back to the next older complete step. With ``state_dict``,
        tensors are copied into it in place after checking every key's shape and dtype
        (a mismatch raises before anything is written) and its non-tensor values are
        updated. ``safe_globals`` lists classes the non-tensor part may construct.

        A step saved by another world size is never loaded: WorldSizeMismatchError
        (see ``latest``). Once damaged bytes have reached ``state_dict``'s tensors, load
        returns only a step that rewrote every one of them; otherwise it raises
        StateModifiedError instead of returning None.
        """
        if step is not None:
            step = validate_step(step)
        excluded: list[int] = []
        touched: set[str] = set()  # this rank's tensors a failed attempt wrote into
        any_touched = False
        while True:
            t0 = time.perf_counter()
            plan = self._plan(step, excluded, on_world_size_mismatch)
            if plan.world_size_mismatch is not None:
                raise self._world_size_error(plan)
            if plan.step is None:
                if any_touched:
                    raise StateModifiedError(
                        f"no complete step of job {self.job_id!r} could be loaded "
                        f"(tried {excluded}), and a failed attempt had already written into "
                        f"the state dict's tensors on some rank ({sorted(touched)[:5]} here): "
                        "they hold partly loaded values. Rebuild the model and optimizer "
                        "state (or load your persistent checkpoint) before training"
                    )
                if step is not None:
                    why = plan.skipped.get(step, "no rank holds it")
                    raise CheckpointNotFoundError(
                        f"step {step} of job {self.job_id!r} cannot be loaded: {why}"
                    )
                log.info("rank %d: no complete memory checkpoint of job %s", self.rank, self.job_id)
                return None
            assert plan.manifest is not None
            locator = ObjectLocator(self.store, self.replicator, self._inventories, plan.step,
                                    dict(enumerate(plan.manifest.digests)))  # fmt: skip
            error: BaseException | None = None
            result = None
            written: set[str] = set()
            planned = plan.sources[self.rank]
            source, fetched, fetch_s = self.rank, 0, 0.0
            t_read = time.perf_counter()
            try:
                received = [0]

                def read(
                    src: ObjectSource, _w: set[str] = written, _r: list[int] = received
                ) -> Any:
                    out = load_object(src, state_dict, map_location=map_location, strict=strict,
                                      safe_globals=safe_globals, written=_w)  # fmt: skip
                    _r[0] = getattr(src, "bytes_received", 0)
                    return out

                result, holder = locator.read(
                    self.rank, read, first=None if planned == self.rank else planned
                )
                if holder is not None:
                    source, fetched = holder, received[0]
                    fetch_s = time.perf_counter() - t_read
            except MemckptError as e:
                error = e
            if error is None:
                missing = touched - written
                if missing:
                    error = StateModifiedError(
                        f"step {plan.step} does not rewrite tensors {sorted(missing)[:5]} that "
                        "a failed load of a newer step had written into"
                    )
            else:
                touched |= written
            votes = self.coll.all_gather_object(
                (error is None, type(error).__name__, str(error) if error else "", bool(touched)),
                f"load vote for step {plan.step}",
            )
            any_touched = any(t for *_, t in votes)
            failed = [(r, kind, msg) for r, (ok, kind, msg, _) in enumerate(votes) if not ok]
            if not failed:
                path = self.store.object_path(plan.step, self.rank)
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
                         f" (read from rank {source}'s node)" if fetched else "")  # fmt: skip
                events.emit("loaded", step=plan.step, rank=self.rank, source=source)
                self._after_load(plan, fetch_from=source if fetched else None)
                return result
            retryable = (
                CorruptCheckpointError.__name__,
                TransferError.__name__,
                StateModifiedError.__name__,
            )
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
            if any_touched and not isinstance(error, StateModifiedError):
                r, kind, msg = failed[0]
                raise StateModifiedError(
                    f"step {plan.step} failed to load on rank {r} ({kind}: {msg}) after "
                    "damaged bytes had reached the state dict's tensors on some rank; "
                    "rebuild the state before training"
                )
            if error is not None:
                raise error
            r, kind, msg = failed[0]
            raise MemckptError(f"step {plan.step} failed to load on rank {r}: {kind}: {msg}")

    def _after_load(self, plan: RecoveryPlan, fetch_from: int | None = None) -> None:
        """The loaded step is the job's again: its manifest and every copy are restored.

        Ranks whose node lacks the step's manifest get it from a rank that has it (one
        all-gather). In the background a rank that read its data from a peer keeps a
        local copy again (so a second failure before the next save still finds it
        here), and every rank pushes its object to holder nodes that lost theirs.
        """
        step = plan.step
        assert step is not None and plan.manifest is not None
        digest = plan.manifest.digests[self.rank]
        self.runtime.ensure_manifest(plan)
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
                outcome = rep.rereplicate(step, invs, digest)
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
        if self._drain_hook is not None:
            self.engine.after_commit.remove(self._drain_hook)
        self.runtime.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
