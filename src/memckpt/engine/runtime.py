"""The node runtime: one per process and job, shared by every saver and loader in it.

It holds the job's store and buffer pool, the collectives (two gloo groups: one for
the caller's thread, one for the background votes), the replicator (transfer server,
client, peer table, plan) and the save engine. ``NodeRuntime.acquire`` is collective
the first time a job is opened in a process (groups are created, servers bound,
addresses exchanged); later acquires of the same job return the same runtime with no
collective, no new group and no new server. ``release`` closes it with the last user.

A job opened twice with different settings (replication, keep_last, ...) is refused
with an error naming only the options that differ, both values, and who opened the
job (the API and the caller's file and line), rather than silently using either.

The runtime also owns the process's ``TransferThrottle`` (``memckpt.transport.bandwidth``):
the replication bandwidth cap (``replication_bandwidth``, else
``MEMCKPT_REPLICATION_BANDWIDTH``), drawn from a token bucket in the job's node tree
that every process of the node shares, and the pause switch behind
``CheckpointManager.pause_replication``.

With ``metrics_port`` (else ``MEMCKPT_METRICS_PORT``) or ``MEMCKPT_METRICS_TEXTFILE``, the
runtime starts this rank's Prometheus exporter (``memckpt.metrics``: one HTTP port per node,
served by the node's first rank) and stops it at the last release.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memckpt.collectives import Collectives, LocalCollectives, TorchCollectives
from memckpt.engine.recovery_plan import RecoveryPlan
from memckpt.engine.save_engine import SaveEngine
from memckpt.engine.save_transaction import Vote
from memckpt.errors import CheckpointNotFoundError, MemckptError
from memckpt.metrics import NodeExporter, port_from_env
from memckpt.metrics import start as start_metrics
from memckpt.replication.replicator import Replicator
from memckpt.replication.strategies import ReplicationStrategy
from memckpt.storage.format import DEFAULT_CHUNK_SIZE
from memckpt.storage.inventory import Inventory
from memckpt.storage.manifest import StepManifest
from memckpt.storage.retention import check_keep_last
from memckpt.storage.store import CheckpointStore
from memckpt.transport.bandwidth import (
    BUCKET_FILE,
    TransferThrottle,
    bandwidth_from_env,
    parse_bandwidth,
)

__all__ = [
    "NodeRuntime",
    "RuntimeOptions",
    "RuntimeSettings",
    "conflict_message",
    "differing_options",
]

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
    replication_bandwidth: int | None = None  # bytes/s per node; None: no cap
    metrics_port: int | str | None = None  # PORT or HOST:PORT of the node's exporter
    timeout_s: float = 300.0
    size_hint: int | None = None
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False)


@dataclass
class RuntimeSettings:
    """The settings an API call names explicitly (None: whatever the open runtime has).

    Framework calls that have no close of their own (DCP's writer and reader, Megatron's
    strategies, ``latest_checkpoint``) open the job's runtime with these through
    :meth:`NodeRuntime.hold`; the ones given must agree with a runtime already open.
    """

    replication: str | None = None
    node_id: str | None = None
    secret: bytes | None = None
    keep_last: int | None = None
    timeout_s: float | None = None
    transfer_timeout_s: float | None = None
    limit_bytes: int | None = None
    replication_bandwidth: int | float | str | None = None

    def options(self) -> tuple[RuntimeOptions, set[str]]:
        """(the runtime options, the names given explicitly)."""
        given = {k: v for k, v in vars(self).items() if v is not None and k != "secret"}
        if "keep_last" in given:
            check_keep_last(given["keep_last"])
        if "replication_bandwidth" in given:
            given["replication_bandwidth"] = parse_bandwidth(given["replication_bandwidth"])
        return RuntimeOptions(**given), set(given)


def _with_bandwidth_from_env(options: RuntimeOptions) -> RuntimeOptions:
    """``options`` with the cap of ``MEMCKPT_REPLICATION_BANDWIDTH`` when they name none
    (an argument wins over the variable); raises ConfigError for a malformed value."""
    if options.replication_bandwidth is not None:
        return options
    rate = bandwidth_from_env()
    return options if rate is None else dataclasses.replace(options, replication_bandwidth=rate)


def _with_metrics_port_from_env(options: RuntimeOptions) -> RuntimeOptions:
    """``options`` with ``MEMCKPT_METRICS_PORT`` when they name no metrics port."""
    if options.metrics_port is not None:
        return options
    port = port_from_env()
    return options if port is None else dataclasses.replace(options, metrics_port=port)


_API_MODULES = ("memckpt.manager", "memckpt.adapters.", "memckpt.engine.")
# frameworks that call memckpt's adapters for the user: the user's own line is further out
_FRAMEWORKS = ("torch.", "lightning.", "pytorch_lightning.", "megatron.", "nvidia_resiliency_ext.")


def _opener() -> str:
    """Who is opening the job: the memckpt API called and the caller's file and line."""
    frame = sys._getframe(1)
    api = None
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith(_FRAMEWORKS):
            frame = frame.f_back
            continue
        if not module.startswith(_API_MODULES):
            where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
            return f"{api} at {where}" if api else where
        if not module.startswith("memckpt.engine."):
            owner = frame.f_locals.get("self")
            api = type(owner).__name__ if owner is not None else frame.f_code.co_name
        frame = frame.f_back
    return api or "unknown"


def conflict_message(
    job_id: str,
    base_dir: str | os.PathLike[str],
    open_options: RuntimeOptions,
    asked: RuntimeOptions,
    names: Iterable[str],
    opened_by: str,
    asked_by: str,
    advice: str,
) -> str:
    """The error for a job opened again with other settings: only the ``names`` that differ,
    each with the value the open runtime has and the value asked for, and who opened it."""
    diffs = "; ".join(
        f"{n}={getattr(open_options, n)!r} where this call asks for {getattr(asked, n)!r}"
        for n in names
    )
    return (
        f"job {job_id!r} under {base_dir} is already open in this process with {diffs} "
        f"(opened by {opened_by}; this call: {asked_by}). {advice}"
    )


def differing_options(a: RuntimeOptions, b: RuntimeOptions) -> list[str]:
    """The compared options whose values differ, in declaration order."""
    return [
        f.name
        for f in dataclasses.fields(RuntimeOptions)
        if f.compare and getattr(a, f.name) != getattr(b, f.name)
    ]


class NodeRuntime:
    """See the module docstring. Build with :meth:`acquire`, give back with :meth:`release`.

    The one registry of open runtimes is here: ``acquire``/``release`` for APIs with a
    close of their own (``CheckpointManager``), ``hold``/``release_held`` for framework
    calls without one (kept open until ``release_held`` or interpreter exit).
    """

    _lock = threading.Lock()
    _open: dict[tuple[str, str], NodeRuntime] = {}
    _held: dict[tuple[str, str], NodeRuntime] = {}

    def __init__(
        self,
        store: CheckpointStore,
        coll: Collectives,
        commit_coll: Collectives,
        network: Replicator | None,
        engine: SaveEngine,
        options: RuntimeOptions,
        key: tuple[str, str],
        connect_args: dict[str, Any] | None = None,
        throttle: TransferThrottle | None = None,
    ) -> None:
        self.store = store
        self.coll = coll
        self.commit_coll = commit_coll
        self.network = network
        self.engine = engine
        self.options = options
        self._key = key
        self._users = 0
        self._connect_args = connect_args or {}
        # the cap and pause switch of this process's pushes and re-replication fetches
        self.throttle = throttle if throttle is not None else TransferThrottle()
        self.opened_by = "unknown"  # the API and caller that opened it, for conflict errors
        self._explicit: set[str] = set()  # settings the opener named (hold)
        self._for_reading = False  # opened by reading calls only (hold)
        # checks that say a step is persisted, registered by whoever drains it
        self.persisted: list[Callable[[int], bool]] = []
        self.metrics: NodeExporter | None = None  # this rank's Prometheus exporter, if on
        self._connected = network is not None or coll.world_size == 1

    @property
    def replicator(self) -> Replicator | None:
        """The replicator when a strategy that fits this layout pushes copies, else None."""
        net = self.network
        return net if net is not None and net.pushes else None

    def connect(self) -> Replicator | None:
        """The peers' transfer services, for reading copies on other nodes (collective).

        Reading never depends on a replication setting: a runtime opened without one
        starts its transfer server and meets the peers the first time a load needs them
        (every rank calls this at the same point of the load). None on one node.
        """
        if not self._connected:
            self._connected = True
            self.network = Replicator.setup(
                self.store, self.coll, None, node_id=self.options.node_id,
                connections=self.options.connections,
                timeout_s=self.options.transfer_timeout_s, throttle=self.throttle,
                **self._connect_args,
            )  # fmt: skip
        return self.network

    @property
    def rank(self) -> int:
        return self.coll.rank

    @property
    def users(self) -> int:
        """How many users (managers, writers, readers) of this process share the runtime."""
        return self._users

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
        """The job's runtime in this process; opens it (collectively) the first time.

        ``options`` without a bandwidth cap take ``MEMCKPT_REPLICATION_BANDWIDTH``'s, without
        a metrics port ``MEMCKPT_METRICS_PORT``'s.
        """
        options = _with_metrics_port_from_env(_with_bandwidth_from_env(options or RuntimeOptions()))
        key = (os.path.realpath(base_dir), str(job_id))
        with cls._lock:
            rt = cls._open.get(key)
            if rt is not None:
                differ = differing_options(rt.options, options)
                if differ:
                    raise MemckptError(conflict_message(
                        job_id, base_dir, rt.options, options, differ, rt.opened_by,
                        _opener(), "Pass the same settings, or close the other manager or "
                        "writer first",
                    ))  # fmt: skip
                rt._users += 1
                return rt
        rt = cls._open_new(base_dir, job_id, options, key, collectives, commit_collectives,
                           strategy, transfer_host, transfer_port, secret, vote)  # fmt: skip
        rt.opened_by = _opener()
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
        throttle = None
        exporter = None
        try:
            throttle = _throttle(store, options.replication_bandwidth)
            exporter = start_metrics(store.layout.peers_dir, store.job_id, collectives.rank,
                                     collectives.world_size, port=options.metrics_port)  # fmt: skip
            spec = strategy if strategy is not None else options.replication
            if spec is not None:
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
                    throttle=throttle,
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
                replicator=replicator if replicator is not None and replicator.pushes else None,
                vote=vote,
            )
        except BaseException:
            if exporter is not None:
                exporter.close()
            if replicator is not None:
                replicator.close()
            if throttle is not None:
                throttle.close()
            store.close()
            raise
        if exporter is not None and engine.replicator is not None:
            exporter.expect("replicated")
        connect_args = {"host": transfer_host, "port": transfer_port, "secret": secret}
        rt = cls(store, collectives, commit_coll, replicator, engine, options, key, connect_args,
                 throttle)  # fmt: skip
        rt.metrics = exporter
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
    def hold(
        cls,
        base_dir: str | os.PathLike[str],
        job_id: str,
        settings: RuntimeSettings,
        *,
        reading: bool = False,
    ) -> NodeRuntime:
        """The job's runtime, held open for framework calls that have no close (collective
        the first time in a process). A runtime already open is reused when the settings
        given explicitly agree with it; otherwise MemckptError names both.

        ``reading``: the call only loads (``latest_checkpoint``, a reader). A runtime
        opened by reading calls alone is reopened (collectively: every rank makes the
        same calls) by the first writer that names settings the readers left unset, so
        the restart lines need not repeat the writer's replication."""
        options, explicit = settings.options()
        key = (os.path.realpath(base_dir), str(job_id))
        with cls._lock:
            rt = cls._held.get(key)
        if rt is not None:
            differ = {n for n in explicit if getattr(rt.options, n) != getattr(options, n)}
            reopen = rt._for_reading and not reading and rt._users == 1
            if differ and not differ & rt._explicit and reopen:
                # opened by a call that left these unset (a reader's latest_checkpoint before
                # the first save, say): reopen with them, keeping what the first call set
                merged = {n: getattr(rt.options, n) for n in rt._explicit}
                merged.update({n: getattr(options, n) for n in explicit})
                log.debug("reopening job %s with %s", job_id, sorted(differ))
                cls.release_held(base_dir, job_id)
                options, explicit, rt = RuntimeOptions(**merged), rt._explicit | explicit, None
        if rt is None:
            rt = cls.find(base_dir, job_id) or cls.acquire(
                base_dir, job_id, options, secret=settings.secret
            )
            if rt._users == 1:
                rt._explicit = set(explicit)
                rt._for_reading = reading
            with cls._lock:
                cls._held[key] = rt
        if not reading:
            rt._for_reading = False
        differ = [n for n in differing_options(rt.options, options) if n in explicit]
        if differ:
            raise MemckptError(conflict_message(
                job_id, base_dir, rt.options, options, differ, rt.opened_by, _opener(),
                "Use the same settings, or close the job first: "
                "memckpt.adapters.dcp.close(base_dir, job_id) (DCP), "
                "memckpt.adapters.megatron.close(base_dir, job_id) (Megatron)",
            ))  # fmt: skip
        return rt

    @classmethod
    def take_held(cls, base_dir: str | os.PathLike[str], job_id: str) -> NodeRuntime | None:
        """Remove one job's held runtime from the registry and return it (the caller releases)."""
        with cls._lock:
            return cls._held.pop((os.path.realpath(base_dir), str(job_id)), None)

    @classmethod
    def release_held(
        cls, base_dir: str | os.PathLike[str] | None = None, job_id: str | None = None
    ) -> None:
        """Close the held runtimes (all, or one job's); waits for saves in flight."""
        want = None if base_dir is None else (os.path.realpath(base_dir), job_id)
        with cls._lock:
            keys = [k for k in cls._held if want is None or k == want]
            rts = [cls._held.pop(k) for k in keys]
        for rt in rts:
            rt.release()

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
        """Give back one use; the last one closes everything, after waiting for the save in
        flight and background work (a load's re-replication), then for re-replication
        transfers still in flight to or from this rank, each bounded by the transfer
        timeout (``Replicator.finish_transfers``)."""
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            self._open.pop(self._key, None)
        holds = self.throttle.resume_all()  # closing must not wait on a pause
        if holds:
            log.info("rank %d: closing job %s with replication paused (%d hold(s)); resumed it "
                     "to finish the transfers in flight", self.rank, self.store.job_id,
                     holds)  # fmt: skip
        self.engine.close()
        if self.network is not None:
            self.network.finish_transfers()
        self.throttle.close()
        if self.network is not None:
            self.network.close()
        if self.metrics is not None:  # after the engine: the last save's samples are written
            self.metrics.close()
        self.store.close()


def _throttle(store: CheckpointStore, rate: int | None) -> TransferThrottle:
    """The process's throttle; with a cap, its bucket is the node's file that every
    process of the node (every rank writing into this job tree) shares."""
    if rate is None:
        return TransferThrottle()
    return TransferThrottle(rate, bucket_path=store.layout.peers_dir / BUCKET_FILE)


atexit.register(NodeRuntime.release_held)
