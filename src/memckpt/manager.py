"""CheckpointManager: the public entry point for memory checkpoints."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from memckpt import ids
from memckpt.collectives import Collectives
from memckpt.engine.drain import (
    DrainPolicy,
    RemoteDrain,
    check_persist,
    drain_objects,
    drained_committed,
    persisted_object,
    persisted_steps,
    schedule_drain,
    stop_waiting_for_parts,
)
from memckpt.engine.handle import SaveHandle
from memckpt.engine.load_transaction import (
    LoadInfo,
    LoadTransaction,
    PersistedCopy,
    load_persisted,
)
from memckpt.engine.recovery_plan import RecoveryPlan
from memckpt.engine.runtime import NodeRuntime, RuntimeOptions
from memckpt.engine.save_transaction import Vote
from memckpt.engine.sources import ObjectSource
from memckpt.engine.tiers import close_and_release, newest_step_persisted, resume_tiers
from memckpt.errors import CheckpointNotFoundError, ConfigError, MemckptError, StorageIOError
from memckpt.replication import ReplicationStrategy
from memckpt.replication.replicator import Replicator
from memckpt.storage.format import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE
from memckpt.storage.reader import load_object
from memckpt.storage.remote import RemoteTier
from memckpt.storage.retention import check_keep_last
from memckpt.storage.store import load_step_manifest
from memckpt.transport.bandwidth import parse_bandwidth

__all__ = ["CheckpointManager", "LoadInfo", "check_persist_arguments"]

log = logging.getLogger(__name__)

_Read = Callable[[ObjectSource, set[str]], Any]
"""Reads one object into the caller's state dict, noting the tensors it wrote into."""


def check_persist_arguments(
    persist_every: object = None, persist_dir: object = None, persist_options: object = None
) -> Path | str | None:
    """Check ``CheckpointManager``'s durable-tier arguments; returns ``persist_dir`` resolved.

    For every API that passes them on (State, NVRx, Lightning, NeMo), at its construction:
    ``persist_every`` needs a ``persist_dir``; a URL scheme fsspec does not know, or whose
    package is not installed, is a ConfigError (never a local ``./s3:/...`` directory);
    ``persist_options`` (fsspec storage options) apply to a URL only.
    """
    where = check_persist(persist_every, persist_dir)
    if persist_options is not None:
        if not isinstance(where, str):
            raise ConfigError("persist_options apply to a persist_dir URL (s3://..., gs://...)")
        if not isinstance(persist_options, Mapping):
            raise ConfigError(f"persist_options must be a dict, got {persist_options!r}")
    return where


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
        replication_bandwidth: cap on the bytes per second this node's replication and
            re-replication send and fetch, shared by the node's ranks: a number, or a
            string with a unit (``"100MB"``, ``"1GiB"``, ``"800 MB/s"``). Default: the
            ``MEMCKPT_REPLICATION_BANDWIDTH`` variable, else no cap. Every rank passes the
            same value. See also ``pause_replication``.
        size_hint: bytes of one rank's checkpoint, if known: a buffer this size is
            pre-faulted in the background at start so the first save is warm (default:
            the size of the newest object this rank finds on its node).
        persist_every, persist_dir: drain every K-th committed step in the background to
            ``persist_dir`` (a disk or shared filesystem path, or an fsspec URL such as
            ``s3://bucket/prefix``: docs/durable.md), as a memckpt tree that
            ``CheckpointManager(persist_dir, job_id)`` loads; retention keeps a step
            until its drain ends. With ``persist_dir`` alone, ``load()`` resumes from it when
            it holds a newer step than memory.
        persist_options: fsspec storage options for a ``persist_dir`` URL (``endpoint_url``,
            ``key``, ``secret``, ...); default: the store's own environment (``AWS_*``).
        persist_policy: retries, timeouts and circuit of drains to a URL
            (``memckpt.engine.drain.DrainPolicy``).
        vote: how a step's completion is decided (default: an all-gather of every rank's
            ballot on a gloo group); see ``memckpt.engine.save_transaction``.
        metrics_port: serve Prometheus metrics on this port (``PORT`` or ``"HOST:PORT"``),
            one exporter per node: the node's first rank serves every local rank's samples
            (docs/operations.md, Metrics; ``pip install 'memckpt[metrics]'``). Default:
            ``MEMCKPT_METRICS_PORT``, else none. Every rank of a node passes the same value.

    Managers (and other savers) of the same job in one process share one node runtime
    (``memckpt.engine.runtime``): one store, buffer pool, transfer server and process group.
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
        replication_bandwidth: int | float | str | None = None,
        size_hint: int | None = None,
        vote: Vote | None = None,
        persist_every: int | None = None,
        persist_dir: str | os.PathLike[str] | None = None,
        persist_options: Mapping[str, Any] | None = None,
        persist_policy: DrainPolicy | None = None,
        metrics_port: int | str | None = None,
    ) -> None:
        check_keep_last(keep_last)
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ConfigError(f"chunk_size must be in (0, {MAX_CHUNK_SIZE}], got {chunk_size}")
        persist_where = check_persist_arguments(persist_every, persist_dir, persist_options)
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
            replication_bandwidth=parse_bandwidth(replication_bandwidth),
            metrics_port=metrics_port,
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
        self._closed = False
        self._drain_hook = None
        self.persist_dir: Path | str | None = persist_where
        self._remote: RemoteTier | None = None
        if isinstance(persist_where, str):
            self._remote = RemoteTier(persist_where, self.job_id, persist_options)
        if persist_every is not None:
            self._drain_hook = self._drainer(persist_every, persist_policy)
            self.engine.after_commit.append(self._drain_hook)
            if rt.metrics is not None:
                rt.metrics.expect("persisted")

    def _drainer(self, every: int, policy: DrainPolicy | None) -> Callable[[int], None]:
        if self._remote is not None:
            remote = RemoteDrain(self.engine, self._remote, policy)

            def to_remote(step: int) -> None:
                if step % every == 0:
                    remote.schedule(step)

            return to_remote
        dest = self.persist_dir
        assert isinstance(dest, Path)

        def hook(step: int) -> None:
            if step % every == 0:
                schedule_drain(
                    self.engine,
                    step,
                    lambda: drain_objects(self.store, step, dest, self.rank == 0),
                    str(ids.JobLayout(dest, self.job_id).step_dir(step)),
                    committed=lambda: drained_committed(dest, self.job_id, step),
                )

        return hook

    @property
    def job_id(self) -> str:
        return self.store.job_id

    @property
    def root(self) -> str:
        return str(self.store.root)

    def save(
        self,
        step: int,
        state_dict: Any,
        *,
        blocking: bool = False,
        check_finite: Callable[[str], bool] | None = None,
    ) -> SaveHandle:
        """Checkpoint ``state_dict`` as ``step``; returns once its tensors are copied.

        The caller may change its tensors as soon as this returns. The rest (hashing,
        commit, vote, retention) runs in the background; ``handle.wait()`` returns the
        SaveResult or raises the error. With ``blocking=True`` it returns committed.
        A save that does not fit (tmpfs, memory cgroup, ``limit_bytes``) is skipped:
        ``wait()`` returns a result with ``committed=False`` and ``skipped`` saying why;
        training goes on and the previous checkpoint stays.

        Floating tensors are checked for NaN/Inf in the background (from the staged
        copy); ``check_finite(name)`` limits the check to the flattened names it accepts
        (``"model.mask"``), for tensors that hold Inf on purpose.
        """
        return self.engine.save(step, state_dict, blocking=blocking, check_finite=check_finite)

    def wait(self) -> None:
        """Wait for the save in flight and the background work queued after it.

        That includes a load's re-replication on this rank: its fetch, and its pushes,
        each up to its bound (a push still running then goes on in the background). It
        does not wait for copies other ranks push to this node; ``close()`` does.
        """
        self.engine.wait_idle()

    def pause_replication(self) -> None:
        """Hold this rank's replication traffic until ``resume_replication()``.

        For a communication-heavy phase of the training step: pushes and
        re-replication fetches stop between two chunks (a chunk in flight finishes) and
        go on from there on resume; nothing is sent again. Pauses are counted (each
        needs its resume) and shared by the job's managers in this process. Every rank
        pauses its own traffic; the other ranks' pushes to this node are theirs to pause.

        The commit vote of a save waits for its replication, so a pause delays the
        commit of a step being replicated (not the ``save()`` call itself). A pause holds
        at most ``MAX_PAUSE_S`` (60 s) at a stretch, then replication goes on with a
        warning. So resume before anything that waits for a save in flight (``save``,
        ``wait``, ``load``, ``latest``): inside the pause it would wait out that limit.
        """
        self.runtime.throttle.pause()

    def resume_replication(self) -> None:
        """Give back one ``pause_replication()``; the last one lets replication go on."""
        self.runtime.throttle.resume()

    @contextlib.contextmanager
    def replication_paused(self) -> Iterator[None]:
        """``with mgr.replication_paused(): ...``: pause around a block, resume after it."""
        self.pause_replication()
        try:
            yield
        finally:
            self.resume_replication()

    def _plan(self, step: int | None, on_world_size_mismatch: str) -> RecoveryPlan:
        txn = LoadTransaction(self.runtime, step, on_world_size_mismatch=on_world_size_mismatch)
        return txn.plan()

    def latest(
        self,
        *,
        on_world_size_mismatch: str = "raise",
        newer_than: int | None = None,
        on_non_finite: str | None = None,
    ) -> int | None:
        """The newest complete step, or None (collective).

        Complete: its manifest exists on a live node, every rank's object it names
        exists, valid, on a live node, and no earlier load found its data damaged on
        every holder. A newer complete step saved by another world size raises
        WorldSizeMismatchError (``on_world_size_mismatch="skip"`` passes over it
        instead). Decided from the inventories the ranks exchange (headers, manifests
        and damage marks; tensor data is verified by ``load``), so it answers in one
        round trip even when nothing survives. A step saved holding NaN/Inf is passed
        over as ``load`` would (``on_non_finite``).
        """
        txn = LoadTransaction(self.runtime, on_world_size_mismatch=on_world_size_mismatch,
                              newer_than=newer_than, on_non_finite=on_non_finite)  # fmt: skip
        return txn.plan().step

    def recovery_plan(self, step: int | None = None) -> RecoveryPlan:
        """Which step ``load`` would take and where each rank's data would come from."""
        return self._plan(step, "skip")

    def load(
        self,
        step: int | None = None,
        state_dict: Any = None,
        *,
        map_location: Any = None,
        strict: bool = True,
        safe_globals: Iterable[Any] = (),
        on_world_size_mismatch: str = "raise",
        newer_than: int | None = None,
        on_non_finite: str | None = None,
    ) -> Any:
        """Load a checkpoint (collective). Returns the state dict, or None if none exists.

        Without ``step`` the newest complete step is loaded; if a rank finds it damaged
        (every copy of its data fails verification) or unreachable, every rank falls back
        to the next older complete step, and the damage is remembered in the job's tree
        so later loads and restarts pass over it. ``newer_than`` considers only newer
        steps (a tier policy's floor). With ``state_dict``, tensors are copied into it in
        place after checking every key's shape and dtype (a mismatch raises before
        anything is written) and its non-tensor values are updated. ``safe_globals``
        lists classes the non-tensor part may construct.

        A step saved by another world size is never loaded: WorldSizeMismatchError
        (see ``latest``). Once damaged bytes have reached ``state_dict``'s tensors, load
        returns only a step that rewrote every one of them; otherwise it raises
        StateModifiedError instead of returning None. The engine's
        ``memckpt.engine.LoadTransaction`` runs the protocol; ``last_load`` says what it did.

        A step saved holding NaN/Inf (recorded at save time) is passed over to the newest
        finite step with ``on_non_finite="skip"``, the default (a step asked for by
        number still loads); ``"load"`` loads it; ``"raise"`` raises
        NonFiniteStateError. None takes ``MEMCKPT_ON_NON_FINITE``, else ``"skip"``.
        """

        def read(src: ObjectSource, written: set[str]) -> Any:
            return load_object(src, state_dict, map_location=map_location, strict=strict,
                               safe_globals=safe_globals, written=written)  # fmt: skip

        if step is None and self.persist_dir is not None:
            return self._resume_tiers(read, on_world_size_mismatch, newer_than, on_non_finite)
        return self._load_memory(step, read, on_world_size_mismatch, newer_than, on_non_finite)

    def _load_memory(
        self,
        step: int | None,
        read: _Read,
        on_world_size_mismatch: str,
        newer_than: int | None,
        on_non_finite: str | None = None,
    ) -> Any:
        txn = LoadTransaction(self.runtime, step, on_world_size_mismatch=on_world_size_mismatch,
                              newer_than=newer_than,
                              on_non_finite=on_non_finite)  # fmt: skip
        out = txn.run(read)
        if out is None:
            return None
        result, self.last_load = out
        return result

    def _resume_tiers(
        self,
        read: _Read,
        on_world_size_mismatch: str,
        newer_than: int | None,
        on_non_finite: str | None = None,
    ) -> Any:
        """Memory and the drained tier by the engine's tier rule (memory on a tie).

        A durable tier that cannot be listed (store unreachable) is passed over when memory
        has a step; with nothing in memory that is an error, never a silent fresh start.
        """
        listed = self._list_persisted()
        steps = listed if isinstance(listed, list) else []
        pstep = max((s for s in steps if newer_than is None or s > newer_than), default=None)
        loaded: list[Any] = []

        def load_memory(floor: int | None) -> int | None:
            low = floor - 1 if floor is not None else newer_than
            out = self._load_memory(None, read, on_world_size_mismatch, low, on_non_finite)
            if out is None or self.last_load is None:
                return None
            loaded.append(out)
            return self.last_load.step

        choice = resume_tiers(load_memory, pstep, pstep is not None)
        if choice.tier == "memory":
            return loaded[0]
        if choice.tier == "none":
            if isinstance(listed, str):
                raise StorageIOError(
                    f"no step in memory and the durable tier {self.persist_dir} cannot be "
                    f"listed ({listed}); fix the store's endpoint or credentials and retry"
                )
            return None
        assert pstep is not None
        return self._load_persisted(pstep, read)

    def _list_persisted(self) -> list[int] | str:
        """Rank 0's listing of the durable tier for every rank (collective): the persisted
        steps, or why they cannot be listed (logged once, on rank 0)."""
        assert self.persist_dir is not None
        found: list[int] | str = ""
        if self.rank == 0:
            try:
                found = self._persisted_steps()
            except (OSError, MemckptError) as e:
                found = f"{type(e).__name__}: {e}"
                log.warning("rank 0: cannot list persisted steps in %s: %s", self.persist_dir,
                            found)  # fmt: skip
        listed: list[int] | str = self.coll.all_gather_object(found, "persisted steps")[0]
        return listed

    def persisted_step(self) -> int | None:
        """The newest step of the durable tier (``persist_dir``), agreed by every rank
        (collective); None without one, or when it cannot be listed (logged)."""
        if self.persist_dir is None:
            return None
        listed = self._list_persisted()
        return max(listed, default=None) if isinstance(listed, list) else None

    def _load_persisted(self, step: int, read: _Read) -> Any:
        """Every rank reads its own persisted object of ``step``, then puts it back into the
        memory tier (collective; ``memckpt.engine.load_transaction.load_persisted``)."""
        assert self.persist_dir is not None
        result, self.last_load = load_persisted(self.runtime, step, self._persisted_object,
                                                read, tier=str(self.persist_dir))  # fmt: skip
        return result

    def _persisted_steps(self) -> list[int]:
        if self._remote is not None:
            return self._remote.persisted_steps()
        assert isinstance(self.persist_dir, Path)
        return persisted_steps(self.persist_dir, self.job_id)

    def _is_persisted(self, step: int) -> bool:
        try:
            return step in self._persisted_steps()
        except (OSError, MemckptError) as e:
            log.warning("rank %d: cannot list %s: %s", self.rank, self.persist_dir, e)
            return False

    @contextlib.contextmanager
    def _persisted_object(self, step: int) -> Iterator[PersistedCopy]:
        """This rank's verified persisted object of ``step``; a URL's is downloaded next to
        the memory tier (the re-seed moves it into the tree) and removed afterwards."""
        if self._remote is None:
            assert isinstance(self.persist_dir, Path)
            path, _ = persisted_object(self.persist_dir, self.job_id, step, self.rank)
            layout = ids.JobLayout(self.persist_dir, self.job_id)
            manifest = load_step_manifest(layout, step)
            if manifest is None:  # removed since persisted_object read it
                raise CheckpointNotFoundError(f"{layout.step_dir(step)}: no drained manifest")
            yield PersistedCopy(path, manifest, str(path))
            return
        remote = self._remote
        with tempfile.TemporaryDirectory(prefix=f".memckpt-restore-{self.job_id}-",
                                         dir=self.store.root.parent) as scratch:  # fmt: skip
            path, _ = remote.download_object(step, self.rank, Path(scratch))
            manifest = remote.manifest(step)
            if manifest is None:
                raise CheckpointNotFoundError(f"{remote.where(step)}: no persisted manifest")
            yield PersistedCopy(path, manifest, remote.where(step, self.rank), scratch=True)

    def close(self, *, release_memory: bool | None = None) -> None:
        """Wait for the save in flight, stop the background worker and the transfer server.

        Before the server stops, it waits for re-replication in flight: this rank's pushes
        still running and the copies peers re-replicate to this node after a load, each
        bounded by the transfer timeout (``memckpt.replication.replicator``).

        Collective. With ``persist_every`` (``release_memory`` None, the default) a normal
        end gives the job's RAM back: once every drain has ended and the newest committed
        step is persisted, each node's memory tier of the job is deleted, in one log
        line (the tier policy, ``memckpt.engine.tiers``). ``release_memory=False`` keeps
        it. Closing while an exception propagates (leaving a ``with`` block by one, or
        from a ``finally`` clause) keeps it too, runs no collective, and stops drains
        waiting for other ranks' parts, which a dead peer would never upload.
        """
        self._close(release_memory, failing=sys.exc_info()[1] is not None)

    def _close(self, release_memory: bool | None, *, failing: bool) -> None:
        """``close``; ``failing``: an exception is on its way out (from a ``with`` block,
        or a ``finally`` clause such as a training loop's): a peer may be dead, so the
        drains stop waiting for other ranks' parts, no collective runs, and memory is
        kept for the restart."""
        if self._closed:
            return
        self._closed = True
        if self._drain_hook is not None:
            self.engine.after_commit.remove(self._drain_hook)
        if failing:
            stop_waiting_for_parts(f"rank {self.rank} is closing after an error")
            release_memory = False
        release = release_memory is not False and self.persist_dir is not None
        if release and newest_step_persisted(self.runtime, self._is_persisted):
            close_and_release(self.runtime, self.runtime.release)
            return
        self.runtime.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._close(None, failing=exc_type is not None)
