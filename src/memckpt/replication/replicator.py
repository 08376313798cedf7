"""Peer replication of one rank's checkpoints: server, peers, pushes and fetches.

``Replicator.setup`` is collective: every rank starts its transfer server, the job
secret is agreed (``MEMCKPT_SECRET`` or generated on rank 0 and shared through the
process group), and every rank learns every other rank's node and address. From
the node layout the replication strategy computes which ranks hold copies of whose
data (``memckpt.replication``).

After a save is committed locally, ``replicate(step)`` pushes this rank's object to
one holder on each holder node, in parallel; it never raises, it reports. It waits
at most ``push_bound_s`` (derived from the client's timeouts, retries and minimum
throughput); a push still running then, or still running when the next step is
replicated, makes that step count as unreplicated instead of holding the save. A
holder that keeps failing is skipped for a while by the client's circuit breaker.

Pushes and the background fetches of re-replication go through the node runtime's
``TransferThrottle`` (``memckpt.transport.bandwidth``): the node's bandwidth cap,
and ``pause()``/``resume()``. The bound ``replicate`` waits counts the cap (at this
rank's share of it) and is extended by the time a pause held the transfers, so a
capped or paused push is not reported unreplicated for being slow on purpose; a
pause holds at most ``max_pause_s`` at a stretch, so the commit that waits for
``replicate`` is delayed by the pause, never held for good.

During recovery ``fetch`` brings back an object this node lost, and ``rereplicate``
pushes this rank's object to holders that lost their copy, so a replaced node again
holds what the strategy says.

Closing, on every rank (``NodeRuntime.release``)::

    throttle.resume_all()          # a pause left on must not hold the close
    engine.close()                 # the save worker: saves, a load's fetch and rereplicate
    replicator.finish_transfers()  # this rank's pushes still running, and the copies the
                                   # peers' rereplicate sends to this rank (each bounded)
    throttle.close()               # a transfer waiting for its turn fails at once
    replicator.close()             # client and server: a transfer still running fails

A receiving rank knows which copies to wait for from the inventories its
``rereplicate`` got (every rank gets the same), so a replaced node does not close
its server while its peers are still pushing to it.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from memckpt import settings
from memckpt.collectives import Collectives
from memckpt.errors import MemckptError, ReplicationConfigError, TransferError
from memckpt.replication import (
    NodeTopology,
    ReplicationPlan,
    ReplicationStrategy,
    strategy_from_spec,
)
from memckpt.storage.inventory import Inventory
from memckpt.storage.safe_fs import write_atomic
from memckpt.storage.store import CheckpointStore
from memckpt.transport.bandwidth import TransferThrottle
from memckpt.transport.client import RemoteObjectReader, TransferClient
from memckpt.transport.protocol import (
    MIN_THROUGHPUT,
    ObjectRef,
    generate_secret,
    secret_from_env,
)
from memckpt.transport.server import TransferServer, format_address

__all__ = [
    "PeerInfo",
    "ReplicationOutcome",
    "Replicator",
    "TreeId",
    "check_one_node_per_tree",
    "default_node_id",
    "plan_copies",
    "tree_id",
]

log = logging.getLogger(__name__)

NODE_ID_ENV = settings.NODE_ID_ENV
HOST_ENV = settings.TRANSFER_HOST_ENV
PORT_ENV = settings.TRANSFER_PORT_ENV


def default_node_id(rank: int) -> str:
    """This process's failure domain: ``MEMCKPT_NODE_ID``, else hostname (+ torchrun's node).

    Under torchrun the node rank (``GROUP_RANK``) is appended, so simulated nodes on
    one host are told apart; with only ``LOCAL_WORLD_SIZE`` set, ``rank //
    LOCAL_WORLD_SIZE`` is. Every rank of a node must get the same id: ranks that share a
    job directory under two ids are refused at setup (``check_one_node_per_tree``).
    """
    explicit = os.environ.get(NODE_ID_ENV)
    if explicit:
        return explicit
    host = socket.gethostname()
    if os.environ.get("GROUP_RANK"):
        return f"{host}/{os.environ['GROUP_RANK']}"
    lws = os.environ.get("LOCAL_WORLD_SIZE", "")
    if lws.isdigit() and int(lws) > 0:
        return f"{host}/{rank // int(lws)}"
    return host


def default_host() -> str:
    """Address to serve on: ``MEMCKPT_TRANSFER_HOST``, else the local address that routes to
    ``MASTER_ADDR`` (the interface the job already uses), else 127.0.0.1."""
    explicit = os.environ.get(HOST_ENV)
    if explicit:
        return explicit
    master = os.environ.get("MASTER_ADDR")
    if master and master not in ("localhost", "127.0.0.1", "::1"):
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(master, 1, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(sockaddr)  # no packet is sent; this only picks the route
                return str(s.getsockname()[0])
        except OSError:
            log.debug("cannot find the route to MASTER_ADDR=%s", master, exc_info=True)
    return "127.0.0.1"


def _machine_id() -> str:
    """This kernel's boot id (unique per machine and boot), else the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


@dataclass(frozen=True)
class TreeId:
    """Which directory a rank's job tree is: equal for two ranks only when both write into
    the same directory (one kernel, one device, one inode), whatever path each used."""

    machine: str
    device: int
    inode: int
    path: str  # its real path, for messages

    def same_tree(self, other: TreeId) -> bool:
        return (self.machine, self.device, self.inode) == (other.machine, other.device,
                                                           other.inode)  # fmt: skip


def tree_id(root: str | os.PathLike[str]) -> TreeId:
    """The identity of the job directory ``root`` (which must exist)."""
    st = os.stat(root)
    return TreeId(_machine_id(), st.st_dev, st.st_ino, os.path.realpath(root))


@dataclass(frozen=True)
class PeerInfo:
    rank: int
    node_id: str
    host: str
    port: int
    tree: TreeId | None = None  # the rank's job directory

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


def check_one_node_per_tree(peers: Sequence[PeerInfo]) -> None:
    """Refuse two node ids on one job directory (pure; every rank decides the same).

    Ranks that write into one directory are one node to replication: with two node ids
    a rank's replicas would be pushed into the directory that holds the originals.
    Raises ReplicationConfigError naming both ranks, both node ids and the directory.
    """
    first: dict[TreeId, PeerInfo] = {}
    for p in peers:
        if p.tree is None:
            continue
        seen = next((q for t, q in first.items() if t.same_tree(p.tree)), None)
        if seen is None:
            first[p.tree] = p
            continue
        if seen.node_id != p.node_id:
            raise ReplicationConfigError(
                f"ranks {seen.rank} and {p.rank} write into one checkpoint directory, "
                f"{p.tree.path}, but name different nodes: {seen.node_id!r} and "
                f"{p.node_id!r}; replicas would be written over the originals. A node id "
                f"names a node: set {NODE_ID_ENV} (or node_id=) per node, the same value for "
                f"every rank of a node (here: one value for ranks {seen.rank} and {p.rank}, "
                "or leave it unset), or give each node its own directory (base_dir)"
            )


@dataclass
class ReplicationOutcome:
    """What pushing one step's object to its holders did."""

    ok: bool
    nbytes: int = 0
    seconds: float = 0.0
    holders: tuple[int, ...] = ()
    errors: list[str] = field(default_factory=list)


class Replicator:
    """This rank's side of peer replication; build it with :meth:`setup` (collective)."""

    def __init__(
        self,
        store: CheckpointStore,
        peers: Sequence[PeerInfo],
        topology: NodeTopology,
        plan: ReplicationPlan | None,
        server: TransferServer,
        client: TransferClient,
        strategy: ReplicationStrategy | None,
    ) -> None:
        self.store = store
        self.rank = store.rank
        self.peers = list(peers)
        self.plan = plan
        self.server = server
        self.client = client
        self.strategy = strategy
        self.topology = topology
        # pushes outlive a replicate() call that stopped waiting for them: never a `with`
        self._pushes = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(2, self.topology.num_nodes),
            thread_name_prefix=f"memckpt-push-r{self.rank}",
        )
        self._running: dict[int, tuple[int, concurrent.futures.Future[int]]] = {}
        # step -> ranks whose object of it a peer's re-replication pushes to this rank
        self._incoming: dict[int, set[int]] = {}
        self._lock = threading.Lock()

    @classmethod
    def setup(
        cls,
        store: CheckpointStore,
        coll: Collectives,
        strategy: str | ReplicationStrategy | None,
        *,
        node_id: str | None = None,
        host: str | None = None,
        port: int | None = None,
        secret: bytes | None = None,
        connections: int = 2,
        timeout_s: float = 30.0,
        retries: int = 2,
        min_throughput: float = MIN_THROUGHPUT,
        throttle: TransferThrottle | None = None,
    ) -> Replicator | None:
        """Start the server and meet the peers (collective). None when there is one node.

        ``throttle``: the node runtime's cap and pause switch, obeyed by pushes and
        fetches (not by a load's reads, ``open_remote``).

        The peers and their transfer servers serve reads whatever the strategy: where a
        copy lives is in the inventories, not in the strategy that pushed it. A strategy
        that does not fit today's layout (or None) leaves ``plan`` None: loads still read
        from any holder, and nothing is pushed (``pushes`` is False), said in one log line.
        """
        strategy = check_strategy(strategy) if strategy is not None else None
        rank = coll.rank
        node_id = node_id or default_node_id(rank)
        secret = secret if secret is not None else secret_from_env()
        if secret is None:
            mine = generate_secret() if rank == 0 else None
            secret = coll.all_gather_object(mine, "job secret exchange")[0]
        assert secret is not None
        if port is None:
            env_port = os.environ.get(PORT_ENV, "")
            local = int(os.environ.get("LOCAL_RANK", "0") or 0)
            port = int(env_port) + local if env_port.isdigit() else 0
        server = TransferServer(store, secret, host=host or default_host(), port=port,
                                timeout_s=timeout_s, min_throughput=min_throughput)  # fmt: skip
        plan: ReplicationPlan | None = None
        try:
            me = PeerInfo(rank, node_id, server.host, server.port, tree_id(store.root))
            peers = coll.all_gather_object(me, "transfer address exchange")
            check_one_node_per_tree(peers)
            topology = NodeTopology.from_node_ids([p.node_id for p in peers])
            if topology.num_nodes < 2:
                if strategy is not None:
                    log.warning(
                        "rank %d: all %d ranks run on one node (%s); nothing to replicate to, "
                        "replication is off. If that is wrong, set %s per node (the same "
                        "value for every rank of a node)",
                        rank,
                        coll.world_size,
                        node_id,
                        NODE_ID_ENV,
                    )
                server.close()
                return None
            if strategy is not None:
                try:
                    plan = strategy.plan(topology)
                except ReplicationConfigError as e:
                    if rank == 0:
                        log.warning(
                            "replication %r does not fit this layout (%s): saves are not "
                            "replicated and re-replication is skipped; loads still read "
                            "every copy from any node",
                            strategy.spec,
                            e,
                        )
        except BaseException:
            server.close()
            raise
        client = TransferClient(store.job_id, secret, rank=rank, connections=connections,
                                timeout_s=timeout_s, retries=retries,
                                min_throughput=min_throughput, throttle=throttle)  # fmt: skip
        if plan is not None:
            assert strategy is not None
            cap = f", at most {throttle.describe()}" if throttle and throttle.rate else ""
            log.info("rank %d on node %s: replicating with %s to ranks %s%s", rank, node_id,
                     strategy.spec, plan.holders_of(rank), cap)  # fmt: skip
        return cls(store, peers, topology, plan, server, client, strategy)

    # -- who ----------------------------------------------------------------------------
    def _addr(self, rank: int) -> tuple[str, int]:
        p = self.peers[rank]
        return p.host, p.port

    @property
    def pushes(self) -> bool:
        """Whether a strategy that fits this layout pushes copies (else it only reads)."""
        return self.plan is not None

    @property
    def copies(self) -> int:
        """Nodes the strategy keeps each rank's data on, its own included (1 without one)."""
        if self.plan is None:
            return 1
        return 1 + len({self.topology.node(h) for h in self.plan.holders_of(self.rank)})

    def holders(self, rank: int | None = None) -> tuple[int, ...]:
        """One holder rank per node that must keep a copy of ``rank``'s data (default: this
        rank's); the ranks a push of that data goes to."""
        if self.plan is None:
            return ()
        seen: set[int] = set()
        out = []
        for h in self.plan.holders_of(self.rank if rank is None else rank):
            node = self.topology.node(h)
            if node not in seen:
                seen.add(node)
                out.append(h)
        return tuple(out)

    def held(self) -> tuple[int, ...]:
        """Ranks whose copies this rank receives (and retires with retention)."""
        return self.plan.held_by(self.rank) if self.plan is not None else ()

    # -- moving data ----------------------------------------------------------------------
    def push_bound_s(self, nbytes: int) -> float:
        """Longest ``replicate`` waits for a push of ``nbytes`` before reporting it
        unreplicated, not counting time paused.

        Under a cap the push is counted at this rank's share of it: the node's cap over
        the node's ranks, each pushing to all its holders at once.
        """
        throttle = self.client.throttle
        share = None
        if throttle is not None and throttle.rate is not None:
            here = len(self.topology.ranks_on(self.topology.node(self.rank)))
            share = throttle.rate / (here * max(1, len(self.holders())))
        return self.client.call_bound_s(nbytes, share) + 1.0

    def _held_s(self) -> float:
        throttle = self.client.throttle
        return throttle.held_s() if throttle is not None else 0.0

    def _push(
        self, step: int, targets: Sequence[int], owner: int | None = None
    ) -> ReplicationOutcome:
        """Push the object to ``targets`` in parallel; waits at most ``push_bound_s``.

        A push still running then (or still running from an earlier step) is reported
        as a failure for this step and left to end on its own deadline.
        """
        t0 = time.perf_counter()
        owner = self.rank if owner is None else owner
        path = self.store.object_path(step, owner)
        ref = ObjectRef(self.store.job_id, step, owner)
        out = ReplicationOutcome(ok=True, holders=tuple(targets))
        if not targets:
            return out
        try:
            size = path.stat().st_size
        except OSError:
            size = 0  # put reports the missing file
        bound = self.push_bound_s(size)
        futs: dict[int, concurrent.futures.Future[int]] = {}
        with self._lock:
            for h in targets:
                where = f"rank {h} ({self.peers[h].address})"
                prev = self._running.get(h)
                if prev is not None and not prev[1].done():
                    out.ok = False
                    out.errors.append(f"{where}: the push of step {prev[0]} to it is still "
                                      f"running, so step {step} is not sent there")  # fmt: skip
                    continue
                try:
                    fut = self._pushes.submit(self.client.put, self._addr(h), ref, path)
                except RuntimeError as e:  # closed
                    out.ok = False
                    out.errors.append(f"{where}: replicator of rank {self.rank} is closed: {e}")
                    continue
                self._running[h] = (step, fut)
                futs[h] = fut
        done = self._wait_pushes(list(futs.values()), bound)
        for h, f in futs.items():
            where = f"rank {h} ({self.peers[h].address})"
            if f not in done:
                out.ok = False
                out.errors.append(f"{where}: push still running after {bound:.1f}s, its bound; "
                                  "reported unreplicated")  # fmt: skip
                continue
            try:
                out.nbytes += f.result()
            except (MemckptError, OSError) as e:
                out.ok = False
                out.errors.append(f"{where}: {e}")
        out.seconds = time.perf_counter() - t0
        if not out.ok:
            log.warning("rank %d: step %d not fully replicated: %s", self.rank, step,
                        "; ".join(out.errors))  # fmt: skip
        return out

    def _wait_pushes(
        self, futs: list[concurrent.futures.Future[int]], bound: float
    ) -> set[concurrent.futures.Future[int]]:
        """Wait for ``futs`` up to ``bound`` seconds plus the time a pause held them."""
        start, held0 = time.monotonic(), self._held_s()
        while True:
            left = start + bound + (self._held_s() - held0) - time.monotonic()
            done, pending = concurrent.futures.wait(futs, timeout=max(0.0, min(left, 1.0)))
            if not pending or left <= 0:
                return done

    def replicate(self, step: int) -> ReplicationOutcome:
        """Push this rank's object of ``step`` to its holders; reports, never raises."""
        return self._push(step, self.holders())

    def fetch(self, step: int, rank: int, source: int) -> int:
        """Bring ``rank``'s object of ``step`` from ``source``'s node into this node."""
        t0 = time.perf_counter()
        ref = ObjectRef(self.store.job_id, step, rank)
        try:
            _, n = self.client.get(self._addr(source), ref, self.store)
        except TransferError as e:
            raise TransferError(f"rank {self.rank}: cannot recover from rank {source}: {e}") from e
        log.info("rank %d: fetched %s (%.1f MB) from rank %d in %.3fs", self.rank, ref.relpath,
                 n / 1e6, source, time.perf_counter() - t0)  # fmt: skip
        return n

    def open_remote(self, step: int, rank: int, source: int) -> RemoteObjectReader:
        """``rank``'s object of ``step`` on ``source``'s node, readable without a local copy."""
        ref = ObjectRef(self.store.job_id, step, rank)
        try:
            return self.client.open_remote(self._addr(source), ref)
        except TransferError as e:
            raise TransferError(f"rank {self.rank}: cannot recover from rank {source}: {e}") from e

    def rereplicate(
        self, step: int, inventories: Sequence[Inventory], digest: int | None = None
    ) -> ReplicationOutcome:
        """Push this rank's ``step`` object to every holder node that lacks it (or holds
        a copy whose digest is not ``digest``)."""

        def has(h: int) -> bool:
            held = inventories[h].get(step)
            if held is None or self.rank not in held.objects:
                return False
            return digest is None or held.objects[self.rank] == digest

        missing = [h for h in self.holders() if not has(h)]
        coming = self.incoming(step, inventories)
        if coming:
            with self._lock:
                self._incoming.setdefault(step, set()).update(coming)
            log.debug("rank %d: peers re-replicate step %d of ranks %s to it", self.rank, step,
                      list(coming))  # fmt: skip
        if missing:
            log.info("rank %d: re-replicating step %d to ranks %s", self.rank, step, missing)
        return self._push(step, missing)

    def incoming(self, step: int, inventories: Sequence[Inventory]) -> tuple[int, ...]:
        """Ranks whose ``rereplicate(step, inventories)`` pushes their object to this rank:
        the ones this rank holds for whose copy its node's inventory lacked (pure)."""
        held = inventories[self.rank].get(step)
        have = held.objects if held is not None else {}
        return tuple(
            r
            for r in range(len(self.peers))
            if r != self.rank and r not in have and self.rank in self.holders(r)
        )

    def finish_transfers(self) -> None:
        """Before closing: wait for this rank's pushes still running and for the copies the
        peers re-replicate to it (see ``incoming``), then return; never raises.

        Pushes are waited for up to their bound (``push_bound_s``). Expected copies are
        waited for until they are all here; the wait gives up once the transfer timeout
        (``timeout_s``) passes with none of them here and no transfer to this rank in
        progress (a peer that died or gave up), and at the latest after ``push_bound_s``,
        the bound the sending peer keeps to.
        """
        with self._lock:
            running = [f for _, f in self._running.values() if not f.done()]
            incoming = sorted((step, r) for step, owners in self._incoming.items() for r in owners)
        bound = self.push_bound_s(self._largest_object())
        if running:
            late = set(running) - self._wait_pushes(running, bound)
            if late:
                log.warning("rank %d: closing with %d push(es) still running after %.1fs",
                            self.rank, len(late), bound)  # fmt: skip
        if not incoming:
            return
        idle_s = self.server.timeout_s
        now = time.monotonic()
        cap, deadline = now + bound, now + idle_s
        while True:
            kept = set(self.store.steps())  # a step retention has deleted is not waited for
            missing = [(s, r) for s, r in incoming
                       if s in kept and not self.store.object_path(s, r).exists()]  # fmt: skip
            if not missing:
                return
            now = time.monotonic()
            if self.server.pending_transfers():  # one is arriving: it keeps its own deadline
                deadline = min(cap, now + idle_s)
            if now >= deadline:
                what = ", ".join(f"rank {r} step {s}" for s, r in missing)
                log.warning("rank %d: closing without the copies of %s that peers were "
                            "re-replicating to it (none arrived in time; transfer timeout "
                            "%.0fs)", self.rank, what, idle_s)  # fmt: skip
                return
            time.sleep(0.02)

    def _largest_object(self) -> int:
        sizes = [0]
        for step in self.store.steps():
            try:
                sizes.append(self.store.object_path(step, self.rank).stat().st_size)
            except OSError:
                continue
        return max(sizes)

    def move_copies(self, step: int, moves: Sequence[tuple[str, int, int]]) -> ReplicationOutcome:
        """Carry out this rank's part of ``plan_copies`` for ``step``, in turn.

        Restores the copies of a step whatever world size saved it.
        """
        out = ReplicationOutcome(ok=True)
        for kind, owner, other in moves:
            if kind == "fetch":
                t0 = time.perf_counter()
                try:
                    n = self.fetch(step, owner, other)
                except MemckptError as e:
                    out.ok = False
                    out.errors.append(str(e))
                    continue
                out.nbytes += n
                out.seconds += time.perf_counter() - t0
                continue
            o = self._push(step, [other], owner)
            out.ok &= o.ok
            out.nbytes += o.nbytes
            out.seconds += o.seconds
            out.holders += o.holders
            out.errors += o.errors
        return out

    def write_peer_file(self, world_size: int) -> None:
        """Record this rank's node, address and replication plan for ``memckpt status``."""
        layout = self.store.layout
        layout.peers_dir.mkdir(exist_ok=True)
        doc = {
            "rank": self.rank,
            "world_size": world_size,
            "node_id": self.peers[self.rank].node_id,
            "address": self.server.address,
            "strategy": self.strategy.spec if self.plan is not None and self.strategy else None,
            "node_of": list(self.topology.node_of),
            "node_ids": [p.node_id for p in self.peers],
            "holders": {
                str(r): list(self.plan.holders_of(r)) if self.plan is not None else []
                for r in range(world_size)
            },
            "time": time.time(),
        }
        write_atomic(layout.peer_file(self.rank), json.dumps(doc, indent=1).encode())

    def close(self) -> None:
        """Stop: pushes still running fail at once (their connections are closed), and so
        do transfers to this rank; ``finish_transfers`` first waits for them."""
        self._pushes.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        self.server.close()


def check_strategy(strategy: object) -> ReplicationStrategy:
    """A strategy object from a spec string or a strategy; raises ReplicationConfigError."""
    if isinstance(strategy, ReplicationStrategy):
        return strategy
    if isinstance(strategy, str):
        return strategy_from_spec(strategy)
    raise ReplicationConfigError(
        f"replication must be a spec string like 'pairwise' or a ReplicationStrategy, "
        f"got {type(strategy).__name__}"
    )


def plan_copies(
    holders: Mapping[int, Sequence[int]],
    node_of: Sequence[int],
    copies: int,
) -> dict[int, list[tuple[str, int, int]]]:
    """Who moves which object where so each is on ``copies`` nodes again (pure).

    ``holders[obj]`` lists the current ranks whose nodes hold object ``obj`` (a saved rank's
    object, whatever world size saved it); ``node_of[r]`` is current rank r's node. An object
    on fewer nodes than ``copies`` (capped by the node count) gets a copy on the next nodes
    in ring order from its first holder's node. On a node where the object's own rank runs
    that rank fetches it (a rank never receives a push of its own object); elsewhere the
    first holder pushes it to the node's lowest rank. Returns rank -> [("push", object,
    target rank) or ("fetch", object, source rank)].
    """
    nodes = sorted(set(node_of))
    first_rank = {n: min(r for r, m in enumerate(node_of) if m == n) for n in nodes}
    want = min(copies, len(nodes))
    out: dict[int, list[tuple[str, int, int]]] = {}
    for obj in sorted(holders):
        hs = sorted(holders[obj])
        if not hs:
            continue
        have = {node_of[h] for h in hs}
        start = nodes.index(node_of[hs[0]])
        ring = [nodes[(start + i) % len(nodes)] for i in range(1, len(nodes))]
        for n in ring:
            if len(have) >= want:
                break
            if n in have:
                continue
            if obj < len(node_of) and node_of[obj] == n:
                out.setdefault(obj, []).append(("fetch", obj, hs[0]))
            else:
                out.setdefault(hs[0], []).append(("push", obj, first_rank[n]))
            have.add(n)
    return out
