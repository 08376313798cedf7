"""The transfer service against hostile or broken endpoints: connections without the
secret, peers that trickle bytes, overlapping or stale PUT parts, abandoned transfers."""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import memckpt
from memckpt.errors import ProtocolError, TransferError
from memckpt.replication import NodeTopology, strategy_from_spec
from memckpt.replication.replicator import PeerInfo, Replicator
from memckpt.storage.reader import ObjectReader, load_object
from memckpt.storage.store import CheckpointStore
from memckpt.transport.client import CircuitBreaker, TransferClient
from memckpt.transport.protocol import (
    HEADER,
    MAGIC,
    Deadline,
    MessageType,
    ObjectRef,
    client_tag,
    encode_frame,
    generate_secret,
    make_nonce,
    recv_exact_into,
    recv_frame,
    send_data_header,
    send_frame,
    server_tag,
)
from memckpt.transport.server import TransferServer

pytestmark = pytest.mark.timeout(90)

log = logging.getLogger(__name__)

SECRET = generate_secret()
LOOPBACK = "127.0.0.1"


# -- helpers ------------------------------------------------------------------------------
def _save(base: Path, step: int, numel: int) -> tuple[Path, dict[str, Any]]:
    with memckpt.CheckpointManager(base, "job", prefault=False) as m:
        sd = {"w": torch.randn(numel), "step": step}
        m.save(step, sd, blocking=True)
    return base / "job" / f"step-{step}" / "rank-0.mck", sd


@pytest.fixture
def peer_b(shm_dir: Path) -> Iterator[dict[str, Any]]:
    """A saved 64 KiB object on node A and a running server of rank 1 on node B."""
    src, sd = _save(shm_dir / "a", 7, 1 << 14)
    store = CheckpointStore(shm_dir / "b", "job", rank=1)
    server = TransferServer(store, SECRET, timeout_s=2.0)
    try:
        yield {"server": server, "store": store, "src": src, "sd": sd,
               "addr": (LOOPBACK, server.port), "replica": shm_dir / "b" / "job" / "step-7" /
               "rank-0.mck"}  # fmt: skip
    finally:
        server.close()
        store.close()


def _object_bytes(path: Path) -> bytes:
    """The object's bytes, without the padding of the buffer file it lives in."""
    with ObjectReader(path) as r:
        end = r.header.end
    return path.read_bytes()[:end]


def _wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _closed_by_peer(s: socket.socket) -> bool:
    poller = select.poll()
    poller.register(s, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        return s.recv(1 << 16, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _authed(addr: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(addr, timeout=5)
    cn = make_nonce()
    s.sendall(encode_frame(MessageType.HELLO, {"job_id": "job", "rank": 9,
                                               "client_nonce": cn.hex()}))  # fmt: skip
    sn = bytes.fromhex(recv_frame(s).payload["server_nonce"])
    s.sendall(encode_frame(MessageType.AUTH, {"client_tag": client_tag(SECRET, "job", cn,
                                                                       sn).hex()}))  # fmt: skip
    assert recv_frame(s).type is MessageType.AUTH_OK
    return s


def _send_part(s: socket.socket, tid: str, offset: int, data: bytes, total: int,
               sent: int | None = None) -> None:  # fmt: skip
    """PUT header and the first ``sent`` bytes (all by default) of a part."""
    s.sendall(encode_frame(MessageType.PUT, {"job_id": "job", "step": 7, "rank": 0,
                                             "offset": offset, "nbytes": len(data),
                                             "total": total, "transfer": tid}))  # fmt: skip
    s.sendall(HEADER.pack(MAGIC, 1, MessageType.DATA, 0, len(data)))
    s.sendall(data if sent is None else data[:sent])


def _reply(s: socket.socket) -> Any:
    return recv_frame(s, max_data=1 << 30)


class _Hostile:
    """Connections that never learn the secret: ``idle`` ones send nothing, ``trickling`` ones
    send a HELLO one byte every ``period`` seconds. A connection the server closes is opened
    again (at most ``reopen`` per sweep), as a scanner or a stuck client would."""

    def __init__(self, addr: tuple[str, int], idle: int, trickling: int, period: float = 0.5,
                 reopen: int = 40) -> None:  # fmt: skip
        self.addr, self.period, self.reopen = addr, period, reopen
        self.hello = HEADER.pack(MAGIC, 1, MessageType.HELLO, 0, 900) + b" " * 900
        self.idle = [self._connect() for _ in range(idle)]
        self.trickling = [self._connect() for _ in range(trickling)]
        self.sent = [0] * trickling
        self.reopened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostile", daemon=True)
        self._thread.start()

    def _connect(self) -> socket.socket:
        s = socket.create_connection(self.addr, timeout=5)
        s.setblocking(False)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            budget = self.reopen
            for i, s in enumerate(self.trickling):
                try:
                    s.send(self.hello[self.sent[i] % len(self.hello) :][:1])
                    self.sent[i] += 1
                except OSError:
                    if budget > 0:
                        budget -= 1
                        self.trickling[i], self.sent[i] = self._swap(s), 0
            for i, s in enumerate(self.idle):
                if budget > 0 and _closed_by_peer(s):
                    budget -= 1
                    self.idle[i] = self._swap(s)

    def _swap(self, old: socket.socket) -> socket.socket:
        old.close()
        self.reopened += 1
        try:
            return self._connect()
        except OSError:
            return old  # closed; retried next sweep

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for s in (*self.idle, *self.trickling):
            s.close()


class _TricklingPeer:
    """A listener at a peer's address that accepts and then sends one byte every ``period``
    seconds on each connection (never a whole frame). With ``secret`` it first completes a
    real handshake and answers each GET with OK and a DATA header, then trickles the data."""

    def __init__(self, period: float = 0.5, secret: bytes | None = None) -> None:
        self.period, self.secret = period, secret
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.addr = (LOOPBACK, self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trickling-peer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        junk = HEADER.pack(MAGIC, 1, MessageType.CHALLENGE, 0, 500) + b" " * 500
        last = 0.0
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = self.sock.accept()
                conn.settimeout(2)
                if self.secret is not None:
                    self._answer_until_data(conn)
                self.conns.append(conn)
            if time.monotonic() - last >= self.period:
                last = time.monotonic()
                for c in self.conns:
                    with contextlib.suppress(OSError):
                        c.send(junk[:1])

    def _answer_until_data(self, conn: socket.socket) -> None:
        assert self.secret is not None
        hello = recv_frame(conn)
        cn = bytes.fromhex(hello.payload["client_nonce"])
        sn = make_nonce()
        send_frame(conn, MessageType.CHALLENGE, {"server_nonce": sn.hex(),
                   "server_tag": server_tag(self.secret, "job", cn, sn).hex()})  # fmt: skip
        recv_frame(conn)
        send_frame(conn, MessageType.AUTH_OK, {})
        while True:  # the size query (nbytes 0) is answered; a data request is trickled
            req = recv_frame(conn)
            nbytes = req.payload["nbytes"]
            send_frame(conn, MessageType.OK, {"nbytes": nbytes, "total": 1 << 20})
            send_data_header(conn, nbytes)
            if nbytes:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        for c in self.conns:
            c.close()


# -- 1. connections without the secret cannot lock peers out ------------------------------
@pytest.mark.timeout(180)
def test_unauthenticated_connections_never_lock_out_pushes_and_fetches(shm_dir):
    # Given a saved 8 MiB object and the server of the node that should hold its replica
    src, sd = _save(shm_dir / "a", 3, 2 << 20)
    ref = ObjectRef("job", 3, 0)
    store_b = CheckpointStore(shm_dir / "b", "job", rank=1)
    store_c = CheckpointStore(shm_dir / "c", "job", rank=0)
    server = TransferServer(store_b, SECRET, timeout_s=5.0)
    addr = (LOOPBACK, server.port)
    client = TransferClient("job", SECRET, timeout_s=5.0, retries=2, backoff_s=0.05)
    hostile: _Hostile | None = None
    threads_before = threading.active_count()
    try:
        # and 600 idle plus 64 trickling connections that do not know the secret
        hostile = _Hostile(addr, idle=600, trickling=64)
        time.sleep(1.0)  # let the trickling ones send a byte or two
        # When a save replicates and a recovery fetches while they are held
        t0 = time.monotonic()
        assert client.put(addr, ref, src) > 8 << 20
        t_put = time.monotonic() - t0
        t0 = time.monotonic()
        path, _ = client.get(addr, ref, store_c)
        t_get = time.monotonic() - t0
        dest = {"w": torch.zeros_like(sd["w"]), "step": 0}
        t0 = time.monotonic()
        with client.open_remote(addr, ref) as remote:
            load_object(remote, dest)
        t_stream = time.monotonic() - t0
        # Then both succeed, bit-exact, in bounded time
        assert torch.equal(load_object(path, None)["w"], sd["w"])
        assert torch.equal(dest["w"], sd["w"])
        log.info("with 600 idle + 64 trickling: put %.3fs, get %.3fs, streaming load %.3fs",
                 t_put, t_get, t_stream)  # fmt: skip
        assert max(t_put, t_get, t_stream) < 10, (t_put, t_get, t_stream)
        # and the server held few of them, each in one thread: evicted ones are closed
        unauth, _ = server.connection_counts()
        assert unauth <= 32
        assert server.stats["evicted"] >= 600 + 64 - 32
        assert threading.active_count() - threads_before < 64
    finally:
        if hostile is not None:
            hostile.close()
        client.close()
        server.close()
        store_b.close()
        store_c.close()


def test_the_handshake_has_one_deadline_and_a_small_hello(peer_b):
    # Given a server whose handshake deadline is its 2 s timeout
    addr = peer_b["addr"]
    hello = HEADER.pack(MAGIC, 1, MessageType.HELLO, 0, 900) + b" " * 900
    trickler = socket.create_connection(addr, timeout=5)
    oversized: socket.socket | None = None
    try:
        # When one connection sends a HELLO one byte every 0.3 s (each inside the timeout)
        t0 = time.monotonic()
        closed_after = None
        for i in range(40):
            try:
                trickler.send(hello[i : i + 1])
            except OSError:
                closed_after = time.monotonic() - t0
                break
            if _closed_by_peer(trickler):
                closed_after = time.monotonic() - t0
                break
            time.sleep(0.3)
        # Then the server closes it once the whole handshake has taken too long
        assert closed_after is not None and closed_after < 4.0, closed_after
        # and a HELLO announcing more than the handshake limit is refused before it is read
        oversized = socket.create_connection(addr, timeout=5)
        oversized.sendall(HEADER.pack(MAGIC, 1, MessageType.HELLO, 0, 4096))
        reply = _reply(oversized)
        assert reply.type is MessageType.ERROR and "1024 byte limit" in reply.payload["message"]
        # and real peers are still served
        with TransferClient("job", SECRET, retries=0) as c:
            assert c.ping(addr) == 1
    finally:
        trickler.close()
        if oversized is not None:
            oversized.close()


# -- 2. peers that trickle bytes cannot hold a save -----------------------------------------
def test_a_trickling_peer_fails_the_push_within_its_deadline_then_is_skipped(peer_b):
    peer = _TricklingPeer(period=0.5)
    client = TransferClient("job", SECRET, timeout_s=1.0, connect_timeout_s=1.0, retries=1,
                            backoff_s=0.05, breaker_failures=2, breaker_cooloff_s=30)  # fmt: skip
    result: dict[str, Any] = {}

    def push() -> None:
        t0 = time.monotonic()
        try:
            client.put(peer.addr, ObjectRef("job", 7, 0), peer_b["src"])
        except TransferError as e:
            result["error"] = str(e)
        result["elapsed"] = time.monotonic() - t0

    try:
        # When a save pushes to an endpoint that sends one byte every 0.5 s
        worker = threading.Thread(target=push, daemon=True)
        worker.start()
        worker.join(timeout=10)
        # Then the push fails within its bound: 2 attempts of a 1 s handshake deadline
        assert not worker.is_alive(), "the push is still blocked on a trickling peer"
        bound = client.call_bound_s(peer_b["src"].stat().st_size)
        assert result["elapsed"] < min(bound, 3.5), result
        assert "missed its deadline" in result["error"]
        # and the next push is skipped at once by the circuit breaker
        t0 = time.monotonic()
        skipped = rf"skipped: peer 127\.0\.0\.1:{peer.addr[1]} failed 2 times in a row, next try in"
        with pytest.raises(TransferError, match=skipped):
            client.put(peer.addr, ObjectRef("job", 7, 0), peer_b["src"])
        assert time.monotonic() - t0 < 0.2
        # while a healthy peer is still served
        assert client.put(peer_b["addr"], ObjectRef("job", 7, 0), peer_b["src"]) > 0
    finally:
        client.close()
        peer.close()


def test_a_peer_trickling_data_after_the_handshake_fails_the_fetch_within_its_deadline(shm_dir):
    peer = _TricklingPeer(period=0.2, secret=SECRET)
    store = CheckpointStore(shm_dir / "c", "job", rank=0)
    # 1 s + 1 MiB at 1 MiB/s: 2 s per attempt, though a byte arrives every 0.2 s
    client = TransferClient("job", SECRET, timeout_s=1.0, retries=1, backoff_s=0.05,
                            min_throughput=1 << 20)  # fmt: skip
    result: dict[str, Any] = {}

    def fetch() -> None:
        t0 = time.monotonic()
        try:
            client.get(peer.addr, ObjectRef("job", 7, 0), store)
        except TransferError as e:
            result["error"] = str(e)
        result["elapsed"] = time.monotonic() - t0

    try:
        worker = threading.Thread(target=fetch, daemon=True)
        worker.start()
        worker.join(timeout=15)
        assert not worker.is_alive(), "the fetch is still blocked on a trickling peer"
        assert 3.5 < result["elapsed"] < 6.0, result
        assert "GET of job/step-7/rank-0.mck bytes 0..1048576" in result["error"]
        assert "missed its deadline of 2.0s" in result["error"]
        # the failed fetch left no buffer behind
        assert list(store.pool.dir.glob("*.buf")) == []
    finally:
        client.close()
        peer.close()
        store.close()


def test_circuit_breaker_opens_after_consecutive_failures_and_a_success_closes_it():
    now = [100.0]
    b = CircuitBreaker(threshold=3, cooloff_s=10, clock=lambda: now[0])
    peer = ("10.0.0.1", 7000)
    for _ in range(2):
        b.failure(peer, "ProtocolError: timed out")
    assert b.check(peer) is None
    b.failure(peer, "ProtocolError: timed out")
    assert b.check(peer) == ("skipped: peer 10.0.0.1:7000 failed 3 times in a row, next try in "
                             "10.0 s (last error: ProtocolError: timed out)")  # fmt: skip
    assert b.check(("10.0.0.2", 7000)) is None  # other peers are not affected
    now[0] += 10.5
    assert b.check(peer) is None  # after the cool-off one attempt is let through
    b.failure(peer, "again")
    assert "failed 4 times in a row" in (b.check(peer) or "")  # it failed: skipped again
    now[0] += 11
    b.success(peer)
    b.failure(peer, "once")
    assert b.check(peer) is None


def test_a_stuck_push_is_reported_unreplicated_and_does_not_hold_the_next_step(shm_dir):
    store = CheckpointStore(shm_dir / "a", "job", rank=0)
    server = TransferServer(store, SECRET)
    client = TransferClient("job", SECRET, timeout_s=0.2, connect_timeout_s=0.2, retries=0)
    peers = [PeerInfo(0, "n0", LOOPBACK, server.port), PeerInfo(1, "n1", LOOPBACK, 9)]
    strategy = strategy_from_spec("pairwise")
    topology = NodeTopology.from_node_ids(["n0", "n1"])
    rep = Replicator(store, peers, topology, strategy.plan(topology), server, client, strategy)
    release = threading.Event()
    client.put = lambda *a, **k: int(release.wait(30))  # type: ignore[method-assign]
    outcomes: list[Any] = []

    def replicate(step: int) -> None:
        t0 = time.monotonic()
        outcomes.append((rep.replicate(step), time.monotonic() - t0))

    try:
        # When the push of step 1 hangs (a peer that holds it beyond every deadline)
        worker = threading.Thread(target=replicate, args=(1,), daemon=True)
        worker.start()
        worker.join(timeout=5)
        # Then replicate() returns within its bound, reporting the step unreplicated
        assert not worker.is_alive(), "replicate() is held by a stuck push"
        out, took = outcomes[0]
        assert not out.ok and "still running after" in out.errors[0]
        assert took < rep.push_bound_s(0) + 0.5
        # and the next step does not wait for it either
        replicate(2)
        out, took = outcomes[1]
        assert not out.ok and "the push of step 1 to it is still running" in out.errors[0]
        assert took < 0.5
    finally:
        release.set()
        rep.close()
        store.close()


# -- 6. overlapping and stale PUT parts -------------------------------------------------------
def test_an_overlapping_part_is_refused_and_nothing_is_published_from_a_failed_transfer(peer_b):
    data = _object_bytes(peer_b["src"])
    total = len(data)
    server, addr = peer_b["server"], peer_b["addr"]
    slow, fast, late = _authed(addr), _authed(addr), _authed(addr)
    try:
        # Given a part covering the whole object, still arriving
        _send_part(slow, "aa" * 16, 0, data, total, sent=total // 2)
        assert _wait_for(lambda: server.pending_transfers() == 1, 5)
        # When another part of the same transfer covers the same bytes
        _send_part(fast, "aa" * 16, 0, data, total)
        # Then it is refused, and nothing is published
        reply = _reply(fast)
        assert reply.type is MessageType.ERROR and "overlaps bytes 0.." in reply.payload["message"]
        assert not peer_b["replica"].exists()
        # When the first part dies, the transfer fails and its id is refused from then on
        slow.close()
        assert _wait_for(lambda: server.pending_transfers() == 0, 5)
        _send_part(late, "aa" * 16, 0, data, total)
        reply = _reply(late)
        assert reply.type is MessageType.ERROR and "already failed" in reply.payload["message"]
        assert not peer_b["replica"].exists()
        assert list(peer_b["store"].pool.dir.glob("*.buf")) == []  # its memory was freed
    finally:
        for s in (slow, fast, late):
            s.close()


def test_a_stale_part_cannot_write_into_or_recycle_a_published_replica(peer_b):
    data = _object_bytes(peer_b["src"])
    total, cut = len(data), len(data) // 3
    a, b, stale = _authed(peer_b["addr"]), _authed(peer_b["addr"]), _authed(peer_b["addr"])
    try:
        # Given a replica published from two disjoint parts
        _send_part(a, "bb" * 16, 0, data[:cut], total)
        assert _reply(a).payload == {"complete": False}
        _send_part(b, "bb" * 16, cut, data[cut:], total)
        assert _reply(b).payload == {"complete": True}
        assert _object_bytes(peer_b["replica"]) == data
        # When a stale part of that transfer arrives, overlapping or not
        _send_part(stale, "bb" * 16, 0, b"\xff" * 64, total)
        reply = _reply(stale)
        assert reply.type is MessageType.ERROR and "already published" in reply.payload["message"]
        # Then the replica is untouched, and buffers the pool hands out are not the replica
        pool = peer_b["store"].pool
        bufs = [pool.acquire(total) for _ in range(3)]
        for buf in bufs:
            buf.tensor.fill_(0xFF)
        assert _object_bytes(peer_b["replica"]) == data
        with ObjectReader(peer_b["replica"]) as r:
            assert r.verify() == []
        for buf in bufs:
            pool.give_back(buf)
        # and a part naming another object under a live transfer id is refused too
        _send_part(a, "cc" * 16, 0, data[:cut], total)
        assert _reply(a).payload == {"complete": False}
        b.sendall(encode_frame(MessageType.PUT, {"job_id": "job", "step": 8, "rank": 0,
                                                 "offset": cut, "nbytes": 16, "total": total,
                                                 "transfer": "cc" * 16}))  # fmt: skip
        b.sendall(HEADER.pack(MAGIC, 1, MessageType.DATA, 0, 16) + b"x" * 16)
        reply = _reply(b)
        assert reply.type is MessageType.ERROR and "carries job/step-7" in reply.payload["message"]
    finally:
        for s in (a, b, stale):
            s.close()


# -- 7. memory of unfinished transfers ------------------------------------------------------
def test_unfinished_transfers_hold_only_what_arrived_and_are_reaped_on_a_timer(shm_dir):
    store = CheckpointStore(shm_dir / "b", "job", rank=1)
    server = TransferServer(store, SECRET, timeout_s=2.0, transfer_timeout_s=0.5)
    addr = (LOOPBACK, server.port)
    total = 32 << 20
    socks = [_authed(addr) for _ in range(3)]
    try:
        # Given three PUTs of 32 MiB objects of which only 4 KiB each arrived
        for i, s in enumerate(socks):
            _send_part(s, f"{i:02x}" * 16, 0, b"\x01" * 4096, total)
            assert _reply(s).payload == {"complete": False}
        assert server.pending_transfers() == 3

        # Then their buffers are sparse: the 96 MiB announced were neither allocated nor zeroed
        def allocated() -> int:
            return sum(p.stat().st_blocks * 512 for p in store.pool.dir.glob("*.buf"))

        assert allocated() < 8 << 20, allocated()
        # and with no other PUT arriving, a timer reaps them and deletes their buffers
        assert _wait_for(lambda: server.pending_transfers() == 0, 5)
        assert _wait_for(lambda: list(store.pool.dir.glob("*.buf")) == [], 2)
        assert server.stats["reaped"] == 3
        # and a late part of a reaped transfer is refused
        _send_part(socks[0], "00" * 16, 4096, b"\x01" * 4096, total)
        reply = _reply(socks[0])
        assert reply.type is MessageType.ERROR and "already abandoned" in reply.payload["message"]
    finally:
        for s in socks:
            s.close()
        server.close()
        store.close()


def test_a_replica_that_does_not_fit_is_refused_naming_replica_peer_and_free_space(peer_b, shm_dir):
    store = CheckpointStore(shm_dir / "full", "job", rank=1, limit_bytes=1 << 20)
    try:
        with TransferServer(store, SECRET) as server, TransferClient("job", SECRET,
                                                                     retries=0) as c:  # fmt: skip
            with pytest.raises(TransferError) as info:
                c.put((LOOPBACK, server.port), ObjectRef("job", 7, 0), peer_b["src"])
            text = str(info.value)
            assert "no room for replica job/step-7/rank-0.mck" in text
            assert "from peer 127.0.0.1:" in text and "bytes free at" in text
            assert "limit_bytes" in text and "a save needs" not in text
            assert c.ping((LOOPBACK, server.port)) == 1
        assert list(store.pool.dir.glob("*.buf")) == []
    finally:
        store.close()


def test_a_deadline_bounds_a_receive_that_gets_a_byte_within_every_timeout() -> None:
    a, b = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.1):
            with contextlib.suppress(OSError):
                a.send(b"x")

    sender = threading.Thread(target=trickle, daemon=True)
    try:
        b.settimeout(1.0)
        sender.start()
        t0 = time.monotonic()
        missed = r"GET of x with peer p missed its deadline of 0\.5s \(\d+ of 100 bytes received\)"
        with pytest.raises(ProtocolError, match=missed):
            recv_exact_into(b, memoryview(bytearray(100)), peer="p",
                            deadline=Deadline(0.5, "GET of x"))  # fmt: skip
        assert 0.4 < time.monotonic() - t0 < 1.0
        assert b.gettimeout() == 1.0  # the per-receive timeout is restored
    finally:
        stop.set()
        sender.join(timeout=2)
        a.close()
        b.close()


def test_unfinished_transfers_per_server_are_capped(peer_b):
    from memckpt.transport.server import _MAX_PENDING_TRANSFERS

    data = _object_bytes(peer_b["src"])
    total = len(data)
    server, addr = peer_b["server"], peer_b["addr"]
    conns = [_authed(addr) for _ in range(_MAX_PENDING_TRANSFERS + 1)]
    try:
        # Given as many unfinished transfers as the server takes (first half of each)
        for i, s in enumerate(conns[:-1]):
            _send_part(s, f"{i:032x}", 0, data[: total // 2], total)
            assert _reply(s).payload == {"complete": False}
        assert server.pending_transfers() == _MAX_PENDING_TRANSFERS
        # When one more transfer starts, it is refused, naming the cap
        _send_part(conns[-1], "ff" * 16, 0, data[: total // 2], total)
        reply = _reply(conns[-1])
        assert reply.type is MessageType.ERROR and "unfinished" in reply.payload["message"]
        # and what the pool holds stays within the cap
        assert server.pending_transfers() == _MAX_PENDING_TRANSFERS
    finally:
        for s in conns:
            s.close()
