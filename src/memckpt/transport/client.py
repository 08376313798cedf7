"""The client side of the transfer service: push replicas, fetch objects, list, ping.

A ``TransferClient`` keeps authenticated connections to each peer open and reuses
them. A large object moves as byte ranges over ``connections`` connections in
parallel: sent with ``sendfile`` straight from the object file, received with
``recv_into`` straight into a mapped pool buffer. Every request has an overall
deadline derived from its size and a minimum throughput, so a peer that trickles
bytes cannot hold a caller. A failed transfer is retried from scratch (new
connections, a new transfer id) with exponential backoff; the final error names
the peer, the object and every attempt's cause. A peer that keeps failing is
skipped for a while (:class:`CircuitBreaker`).

With a :class:`~memckpt.transport.bandwidth.TransferThrottle`, puts and gets move
each part as a run of smaller requests (chunks) of one transfer, and every chunk
first waits for its turn (the node's cap, a pause). The wait comes before the
request, so deadlines count only the time bytes are on the wire: a part's
requests share the part's budget, ``timeout_s + part / min_throughput``, spent
only while a request runs. Loads' reads (``open_remote``) are never throttled.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hmac
import logging
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from memckpt.errors import (
    AuthenticationError,
    ConfigError,
    CorruptCheckpointError,
    InsufficientSpaceError,
    MemckptError,
    ProtocolError,
    TransferError,
)
from memckpt.storage.faults import fault_point
from memckpt.storage.format import (
    HEADER_SIZE,
    TensorEntry,
    checksum,
    read_header,
)
from memckpt.storage.pool import Buffer
from memckpt.storage.reader import TensorDamage, read_sections, verify_object_bytes
from memckpt.storage.safe_fs import open_regular
from memckpt.storage.store import CheckpointStore
from memckpt.transport.bandwidth import TransferThrottle
from memckpt.transport.protocol import (
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_LENGTH,
    MAX_HANDSHAKE_PAYLOAD,
    MIN_THROUGHPUT,
    Deadline,
    MessageType,
    ObjectRef,
    client_tag,
    format_address,
    make_nonce,
    parse_hex_field,
    parse_int_field,
    recv_exact_into,
    recv_frame,
    send_data_header,
    send_frame,
    sendfile_exact,
    server_tag,
    validate_secret,
)

__all__ = ["Address", "CircuitBreaker", "RemoteObjectReader", "TransferClient", "parse_address"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Address = tuple[str, int]
_MIN_PART = 32 << 20
_PART_ALIGN = 1 << 20


def parse_address(text: str) -> Address:
    """``host:port`` or ``[v6]:port`` to a (host, port) tuple."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"bad peer address {text!r}; expected host:port or [v6addr]:port")
    return host.strip("[]"), int(port)


def _fmt(addr: Address) -> str:
    return format_address(*addr)


class _Connection:
    """One authenticated connection to a peer's server.

    ``deadline`` bounds the exchange now running on it (set per request); every send
    and receive below honours it as well as the socket's per-operation timeout.
    """

    def __init__(self, addr: Address, job_id: str, secret: bytes, rank: int, timeout_s: float,
                 connect_timeout_s: float, deadline: Deadline) -> None:  # fmt: skip
        self.addr = addr
        self.peer = _fmt(addr)
        self.deadline = deadline
        connect_s = max(1e-3, min(connect_timeout_s, deadline.remaining()))
        self.sock = socket.create_connection(addr, timeout=connect_s)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(timeout_s)
            handshake = Deadline(min(timeout_s, deadline.remaining()), "handshake")
            self._handshake(job_id, secret, rank, handshake)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, job_id: str, secret: bytes, rank: int, deadline: Deadline) -> None:
        cnonce = make_nonce()
        send_frame(self.sock, MessageType.HELLO,
                   {"job_id": job_id, "rank": rank, "client_nonce": cnonce.hex()},
                   peer=self.peer, deadline=deadline)  # fmt: skip
        # the server is not authenticated yet: small frames only, within the deadline
        ch = self._expect(MessageType.CHALLENGE, 0, MAX_HANDSHAKE_PAYLOAD, deadline)
        snonce = parse_hex_field(ch.payload, "server_nonce", len(cnonce), peer=self.peer)
        tag = parse_hex_field(ch.payload, "server_tag", 32, peer=self.peer)
        if not hmac.compare_digest(tag, server_tag(secret, job_id, cnonce, snonce)):
            raise AuthenticationError(
                f"peer {self.peer} does not know the job secret of {job_id!r}; refusing to talk"
            )
        send_frame(self.sock, MessageType.AUTH,
                   {"client_tag": client_tag(secret, job_id, cnonce, snonce).hex()},
                   peer=self.peer, deadline=deadline)  # fmt: skip
        self._expect(MessageType.AUTH_OK, 0, MAX_HANDSHAKE_PAYLOAD, deadline)

    def send(self, mtype: MessageType, payload: dict[str, Any]) -> None:
        send_frame(self.sock, mtype, payload, peer=self.peer, deadline=self.deadline)

    def send_file(self, fd: int, offset: int, nbytes: int) -> None:
        """Send ``nbytes`` of ``fd`` from ``offset`` (after ``send_data_header``)."""
        sendfile_exact(self.sock, fd, offset, nbytes, peer=self.peer, deadline=self.deadline)

    def send_data_header(self, nbytes: int) -> None:
        send_data_header(self.sock, nbytes, peer=self.peer, deadline=self.deadline)

    def recv_into(self, view: memoryview) -> None:
        recv_exact_into(self.sock, view, peer=self.peer, deadline=self.deadline)

    def expect(self, mtype: MessageType, max_data: int = 0) -> Any:
        return self._expect(mtype, max_data, MAX_CONTROL_PAYLOAD, self.deadline)

    def _expect(self, mtype: MessageType, max_data: int, max_payload: int,
                deadline: Deadline) -> Any:  # fmt: skip
        frame = recv_frame(self.sock, max_payload, peer=self.peer, max_data=max_data,
                           deadline=deadline)  # fmt: skip
        if frame.type is MessageType.ERROR:
            message = str(frame.payload.get("message", ""))[:500]
            if mtype is MessageType.AUTH_OK:
                raise AuthenticationError(f"peer {self.peer} refused us: {message}")
            raise _RemoteError(f"peer {self.peer}: {message}")
        if frame.type is not mtype:
            raise ProtocolError(f"expected {mtype.name} from {self.peer}, got {frame.type.name}")
        return frame

    def stale(self) -> bool:
        """Whether an idle connection was closed by the peer (or holds unexpected bytes)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _RemoteError(MemckptError):
    """The peer answered ERROR (the connection stays usable)."""


@dataclass(frozen=True)
class RemoteObject:
    step: int
    rank: int
    size: int


@dataclass
class _PeerHealth:
    failures: int = 0
    skip_until: float = 0.0
    last_error: str = ""


class CircuitBreaker:
    """Per-peer circuit breaker: a peer that failed ``threshold`` times in a row is skipped
    for ``cooloff_s`` seconds; then one attempt is let through, and a success closes it.

    Thread-safe. ``clock`` is injectable for tests (``time.monotonic`` by default).
    """

    def __init__(self, threshold: int = 3, cooloff_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.threshold = max(1, threshold)
        self.cooloff_s = cooloff_s
        self.clock = clock
        self._peers: dict[Address, _PeerHealth] = {}
        self._lock = threading.Lock()

    def check(self, addr: Address) -> str | None:
        """None when ``addr`` may be tried now, else why it is skipped."""
        with self._lock:
            h = self._peers.get(addr)
            if h is None or h.failures < self.threshold:
                return None
            left = h.skip_until - self.clock()
            if left <= 0:
                return None
            return (f"skipped: peer {_fmt(addr)} failed {h.failures} times in a row, next try "
                    f"in {left:.1f} s (last error: {h.last_error[:300]})")  # fmt: skip

    def failure(self, addr: Address, error: str) -> None:
        with self._lock:
            h = self._peers.setdefault(addr, _PeerHealth())
            h.failures += 1
            h.last_error = error
            if h.failures >= self.threshold:
                h.skip_until = self.clock() + self.cooloff_s
                if h.failures == self.threshold:
                    log.warning("peer %s failed %d times in a row; skipping it for %.0fs",
                                _fmt(addr), h.failures, self.cooloff_s)  # fmt: skip

    def success(self, addr: Address) -> None:
        with self._lock:
            self._peers.pop(addr, None)


class _Budget:
    """Seconds the requests of one part may spend on the wire, all together.

    Waiting for a throttle's turn happens between requests and is not spent, so a
    part sent slowly on purpose (a cap, a pause) keeps the deadline of a fast one.
    """

    def __init__(self, seconds: float, how: str) -> None:
        self.left = seconds
        self.how = how

    def deadline(self, base_s: float, nbytes: int, min_throughput: float,
                 what: str) -> Deadline:  # fmt: skip
        own = Deadline.for_transfer(base_s, nbytes, min_throughput, what)
        if self.left >= own.seconds:
            return own
        return Deadline(self.left, what, f"what is left of its part's budget of {self.how}")

    def spend(self, seconds: float) -> None:
        self.left -= seconds


def _counts_against_peer(e: BaseException) -> bool:
    """Whether a failed attempt says the peer is unreachable, stalled or speaks garbage
    (not: it answered ERROR, its data was corrupt, or this node lacks space)."""
    if isinstance(e, InsufficientSpaceError):
        return False
    return isinstance(e, (ProtocolError, OSError))


class TransferClient:
    """Authenticated, pooled, parallel transfers to the servers of one job's ranks.

    Every request has an overall deadline of ``timeout_s + nbytes / min_throughput``
    (handshake included when it opens a connection), however the peer paces its
    bytes; so one attempt of a transfer ends within that, and a call within
    ``(retries + 1)`` times it plus the backoff. A peer whose attempts failed
    ``breaker_failures`` times in a row is skipped for ``breaker_cooloff_s``: calls
    to it raise TransferError at once, saying so.

    Args:
        job_id, secret: must match the peer servers'.
        rank: this rank (sent in HELLO, for the peer's logs).
        connections: parallel connections per large object.
        timeout_s: per socket operation, and the base of every deadline;
            connect_timeout_s for connecting.
        retries: attempts after the first, with backoff ``backoff_s * 3**i``.
        min_throughput: bytes per second a transfer may not fall below (time waiting
            for the throttle's turn does not count).
        breaker_failures, breaker_cooloff_s: the per-peer circuit breaker.
        throttle: the node's cap and the pause switch that puts and gets obey, chunk
            by chunk (``memckpt.transport.bandwidth``); None sends each part at once.
    """

    def __init__(
        self,
        job_id: str,
        secret: bytes,
        *,
        rank: int = 0,
        connections: int = 2,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        retries: int = 2,
        backoff_s: float = 0.2,
        verify_threads: int = 2,
        min_throughput: float = MIN_THROUGHPUT,
        breaker_failures: int = 3,
        breaker_cooloff_s: float = 60.0,
        throttle: TransferThrottle | None = None,
    ) -> None:
        self.job_id = job_id
        self.secret = validate_secret(secret)
        self.rank = rank
        self.connections = max(1, connections)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.verify_threads = verify_threads
        if min_throughput <= 0:
            raise ConfigError(
                f"min_throughput must be positive bytes per second, got {min_throughput}"
            )
        self.min_throughput = min_throughput
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooloff_s)
        self.throttle = throttle
        self._idle: dict[Address, list[_Connection]] = {}
        self._live: set[_Connection] = set()  # every open connection, idle or in use
        self._closed = False
        self._lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=4 * self.connections, thread_name_prefix=f"memckpt-xfer-r{rank}"
        )

    def attempt_bound_s(self, nbytes: int) -> float:
        """Longest one attempt moving ``nbytes`` in one part may spend on the wire
        (seconds); waits for the throttle's turn come on top."""
        return self.timeout_s + nbytes / self.min_throughput

    def call_bound_s(self, nbytes: int, share: float | None = None) -> float:
        """Longest a put or get of ``nbytes`` may take, every retry and backoff included.

        Under a capped throttle each attempt also waits for its bytes' turns, at
        ``share`` bytes per second (default: the whole cap; less when other transfers
        of the node draw from the bucket at the same time). Time paused is not
        included: see ``TransferThrottle.held_s``.
        """
        attempts = self.retries + 1
        backoff = sum(self.backoff_s * 3**i for i in range(self.retries))
        rate = self.throttle.rate if self.throttle is not None else None
        capped = nbytes / (share or rate) if rate else 0.0
        # a get asks for the size first (one request without data), then the parts
        return attempts * (self.connect_timeout_s + 2 * self.timeout_s
                           + nbytes / self.min_throughput + capped) + backoff  # fmt: skip

    # -- connection pool -------------------------------------------------------------------
    def _checkout(self, addr: Address, deadline: Deadline) -> _Connection:
        while True:
            with self._lock:
                if self._closed:
                    raise TransferError(f"transfer client of rank {self.rank} is closed")
                idle = self._idle.get(addr)
                conn = idle.pop() if idle else None
            if conn is None:
                break
            if conn.stale():  # the peer closed it while idle (restart, idle timeout)
                self._discard(conn)
                continue
            conn.deadline = deadline
            return conn
        conn = _Connection(addr, self.job_id, self.secret, self.rank, self.timeout_s,
                           self.connect_timeout_s, deadline)  # fmt: skip
        with self._lock:
            closed = self._closed
            if not closed:
                self._live.add(conn)
        if closed:
            conn.close()
            raise TransferError(f"transfer client of rank {self.rank} is closed")
        return conn

    def _checkin(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault(conn.addr, []).append(conn)
                return
        self._discard(conn)

    def _discard(self, conn: _Connection) -> None:
        # closed under the lock: close() never shuts down a descriptor reused meanwhile
        with self._lock:
            self._live.discard(conn)
            conn.close()

    def _drop_idle(self, addr: Address) -> None:
        with self._lock:
            conns = self._idle.pop(addr, [])
        for c in conns:
            self._discard(c)

    def _call(self, addr: Address, fn: Callable[[_Connection], T], nbytes: int = 0,
              what: str = "request", budget: _Budget | None = None) -> T:  # fmt: skip
        """Run one request on a pooled connection within its deadline (and within what
        is left of its part's ``budget``); a broken connection is closed, not reused."""
        if budget is None:
            deadline = Deadline.for_transfer(self.timeout_s, nbytes, self.min_throughput, what)
        else:
            deadline = budget.deadline(self.timeout_s, nbytes, self.min_throughput, what)
        t0 = time.monotonic()
        try:
            conn = self._checkout(addr, deadline)
            try:
                result = fn(conn)
            except _RemoteError:
                self._checkin(conn)
                raise
            except BaseException:
                self._discard(conn)
                raise
            self._checkin(conn)
            return result
        finally:
            if budget is not None:
                budget.spend(time.monotonic() - t0)

    def _retrying(self, what: str, addr: Address, fn: Callable[[], T]) -> T:
        causes: list[str] = []
        for attempt in range(self.retries + 1):
            skip = self.breaker.check(addr)
            if skip is not None:
                before = f" (after {'; '.join(causes)})" if causes else ""
                raise TransferError(f"{what} with peer {_fmt(addr)} {skip}{before}")
            try:
                result = fn()
            except AuthenticationError as e:
                self.breaker.failure(addr, f"{type(e).__name__}: {e}")
                raise TransferError(f"{what} with peer {_fmt(addr)}: {e}") from e
            except (OSError, MemckptError) as e:
                if _counts_against_peer(e):
                    self.breaker.failure(addr, f"{type(e).__name__}: {e}")
                causes.append(f"attempt {attempt + 1}: {type(e).__name__}: {e}")
                self._drop_idle(addr)
                if attempt < self.retries:
                    delay = self.backoff_s * 3**attempt
                    log.info("rank %d: %s with %s failed (%s); retrying in %.1fs", self.rank, what,
                             _fmt(addr), e, delay)  # fmt: skip
                    time.sleep(delay)
            else:
                self.breaker.success(addr)
                return result
        raise TransferError(f"{what} with peer {_fmt(addr)} failed: " + "; ".join(causes))

    def _parts(self, total: int) -> list[tuple[int, int]]:
        n = max(1, min(self.connections, total // _MIN_PART))
        size = -(-total // n // _PART_ALIGN) * _PART_ALIGN
        return [(o, min(size, total - o)) for o in range(0, total, size)]

    def _chunks(self, offset: int, nbytes: int) -> list[tuple[int, int]]:
        """The requests one part goes as: itself, or the throttle's chunks."""
        size = self.throttle.chunk_bytes if self.throttle is not None else None
        if size is None or nbytes == 0:
            return [(offset, nbytes)]
        return [(o, min(size, offset + nbytes - o)) for o in range(offset, offset + nbytes, size)]

    def _budget_how(self, nbytes: int) -> str:
        return f"{self.timeout_s:g}s + {nbytes} bytes at {self.min_throughput / (1 << 20):g} MiB/s"

    def _part_budget(self, nbytes: int) -> _Budget | None:
        if self.throttle is None:
            return None
        return _Budget(self.attempt_bound_s(nbytes), self._budget_how(nbytes))

    def _turn(self, nbytes: int, what: str) -> None:
        if self.throttle is not None:
            self.throttle.wait_turn(nbytes, what)

    # -- requests ----------------------------------------------------------------------------
    def ping(self, addr: Address) -> int:
        """Round trip to a peer; returns its rank."""

        def req(c: _Connection) -> int:
            c.send(MessageType.PING, {})
            return int(c.expect(MessageType.OK).payload.get("rank", -1))

        return self._retrying("ping", addr, lambda: self._call(addr, req, what="PING"))

    def list(self, addr: Address) -> list[RemoteObject]:
        """The valid objects of this job the peer's node holds."""

        def req(c: _Connection) -> list[RemoteObject]:
            c.send(MessageType.LIST, {"job_id": self.job_id})
            objs = c.expect(MessageType.OK).payload.get("objects")
            if not isinstance(objs, list):
                raise ProtocolError(f"LIST reply from {c.peer} has no object list")
            return [RemoteObject(int(s), int(r), int(n)) for s, r, n in objs]

        return self._retrying("list", addr, lambda: self._call(addr, req, what="LIST"))

    def put(self, addr: Address, ref: ObjectRef, path: str | os.PathLike[str]) -> int:
        """Replicate the object file at ``path`` to the peer; returns the bytes sent.

        Returns only once the peer has verified and published the replica; ends within
        ``call_bound_s(size)`` plus the time paused, whatever the peer does. Under a
        throttle the bytes go chunk by chunk, each at its turn; a pause stops between
        two chunks and the transfer goes on from there.
        """
        what = f"sending {ref.relpath}"
        return self._retrying(what, addr, lambda: self._put_once(addr, ref, Path(path)))

    def _put_once(self, addr: Address, ref: ObjectRef, path: Path) -> int:
        fd = open_regular(path, "object")
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", str(path))
        try:
            total = read_header(fd, str(path)).end
            tid = secrets.token_hex(16)

            def send_part(offset: int, nbytes: int) -> bool:
                return self._put_part(addr, ref, fd, total, tid, offset, nbytes)

            done = self._run_parts(send_part, self._parts(total))
            if not any(done):
                raise ProtocolError(f"peer {_fmt(addr)} never confirmed {ref.relpath} complete")
            return total
        finally:
            os.close(fd)

    def _put_part(self, addr: Address, ref: ObjectRef, fd: int, total: int, tid: str,
                  offset: int, nbytes: int) -> bool:  # fmt: skip
        """Send one part as PUT requests of its chunks, on one connection; returns whether
        the peer said the object is complete (it says so on the last chunk it receives).

        The reply to a chunk is read after the next chunk is sent, so the link does not
        idle while the peer drains its socket and answers. Each send and reply read has
        a deadline within what is left of the part's budget; waits for the throttle's
        turn come between them and are not spent.
        """
        budget = _Budget(self.attempt_bound_s(nbytes), self._budget_how(nbytes))
        conn: _Connection | None = None
        unanswered = False  # a chunk whose reply is still to be read
        complete = False

        def read_reply(c: _Connection) -> bool:
            c.deadline = Deadline(budget.left, "PUT reply",
                                  f"what is left of its part's budget of {budget.how}")  # fmt: skip
            return bool(c.expect(MessageType.OK).payload.get("complete"))

        try:
            for o, n in self._chunks(offset, nbytes):
                what = f"PUT of {ref.relpath} bytes {o}..{o + n}"
                self._turn(n, what)
                t0 = time.monotonic()
                deadline = budget.deadline(self.timeout_s, n, self.min_throughput, what)
                if conn is None:
                    conn = self._checkout(addr, deadline)
                conn.deadline = deadline
                conn.send(MessageType.PUT, {**ref.to_payload(), "offset": o, "nbytes": n,
                                            "total": total, "transfer": tid})  # fmt: skip
                conn.send_data_header(n)
                half = n // 2 if o == 0 else 0  # a fault point sits there
                conn.send_file(fd, o, half)
                fault_point("mid_replica_send", ref.step)
                conn.send_file(fd, o + half, n - half)
                if unanswered:
                    complete = read_reply(conn)
                unanswered = True
                budget.spend(time.monotonic() - t0)
            if conn is not None and unanswered:
                t0 = time.monotonic()
                complete = read_reply(conn)
                budget.spend(time.monotonic() - t0)
        except BaseException:
            if conn is not None:  # a reply may be left unread: never reused
                self._discard(conn)
            raise
        if conn is not None:
            self._checkin(conn)
        return complete

    def _run_parts(self, fn: Callable[[int, int], T], parts: list[tuple[int, int]]) -> list[T]:
        if len(parts) == 1:
            return [fn(*parts[0])]
        futs = [self._executor.submit(fn, o, n) for o, n in parts]
        concurrent.futures.wait(futs)
        return [f.result() for f in futs]

    def get(self, addr: Address, ref: ObjectRef, store: CheckpointStore) -> tuple[Path, int]:
        """Fetch the object ``ref`` from the peer into ``store``; returns (path, bytes).

        The bytes land in a buffer of the store's pool, are verified, then renamed to
        their final name: nothing partial or corrupt is ever visible. Ends within
        ``call_bound_s(size)`` plus the time paused, whatever the peer does; obeys the
        throttle chunk by chunk, as ``put`` does.
        """
        what = f"fetching {ref.relpath}"
        return self._retrying(what, addr, lambda: self._get_once(addr, ref, store))

    def _get_once(self, addr: Address, ref: ObjectRef, store: CheckpointStore) -> tuple[Path, int]:
        total, _ = self._get_range(addr, ref, 0, 0, None)
        try:
            buf: Buffer = store.pool.acquire_sparse(total)
        except InsufficientSpaceError as e:
            raise TransferError(f"no space to fetch {ref.relpath} from {_fmt(addr)}: {e}") from e
        try:
            view = buf.memoryview()

            def get_part(offset: int, nbytes: int) -> None:
                store.pool.reserve(buf, offset, offset + nbytes)
                budget = self._part_budget(nbytes)
                for o, n in self._chunks(offset, nbytes):
                    self._turn(n, f"GET of {ref.relpath} bytes {o}..{o + n}")
                    self._get_range(addr, ref, o, n, view[o : o + n], budget)

            self._run_parts(get_part, self._parts(total))
            where = f"{ref.relpath} fetched from {_fmt(addr)}"
            _, index = verify_object_bytes(view[:total], where, threads=self.verify_threads)
            if (index.job_id, index.step, index.rank) != (ref.job_id, ref.step, ref.rank):
                raise CorruptCheckpointError(f"{where}: holds another object")
            path = store.adopt(ref.step, ref.rank, buf)
        except BaseException:
            store.pool.discard(buf)  # never reused: may have holes
            raise
        return path, total

    def _get_range(
        self,
        addr: Address,
        ref: ObjectRef,
        offset: int,
        nbytes: int,
        into: memoryview | None,
        budget: _Budget | None = None,
    ) -> tuple[int, bytes]:
        """GET bytes ``[offset, offset+nbytes)`` of an object; returns (object total, bytes).

        With ``into`` the bytes land there (``recv_into``) and b"" is returned.
        """

        def req(c: _Connection) -> tuple[int, bytes]:
            c.send(MessageType.GET, {**ref.to_payload(), "offset": offset, "nbytes": nbytes})
            total = parse_int_field(c.expect(MessageType.OK).payload, "total", peer=c.peer,
                                    maximum=MAX_DATA_LENGTH)  # fmt: skip
            head = c.expect(MessageType.DATA, max_data=nbytes)
            if head.length != nbytes:
                raise ProtocolError(f"{c.peer} sent {head.length} bytes, asked {nbytes}")
            if into is not None:
                c.recv_into(into)
                return total, b""
            raw = bytearray(nbytes)
            c.recv_into(memoryview(raw))
            return total, bytes(raw)

        what = f"GET of {ref.relpath} bytes {offset}..{offset + nbytes}"
        return self._call(addr, req, nbytes, what, budget)

    def open_remote(self, addr: Address, ref: ObjectRef) -> RemoteObjectReader:
        """Read an object on a peer without storing it here (see RemoteObjectReader)."""
        what = f"opening {ref.relpath}"
        return self._retrying(what, addr, lambda: RemoteObjectReader(self, addr, ref))

    def close(self) -> None:
        """Close every connection; requests still running fail at once."""
        with self._lock:
            self._closed = True
            self._idle = {}
            live, self._live = list(self._live), set()
            for c in live:  # wakes up a request blocked on it; its thread closes it
                c.shutdown()
        self._executor.shutdown(wait=True)
        for c in live:
            c.close()

    def __enter__(self) -> TransferClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteObjectReader:
    """An object on a peer, read like ``memckpt.storage.reader.ObjectReader`` (for ``load_object``).

    Opening fetches and checks the header, index and non-tensor part. ``read_all``
    then receives each tensor's bytes straight into its destination (the caller's
    tensors, for an in-place load) with ``recv_into``, spread over the client's
    connections, and checks every chunk's checksum: recovery needs no local copy
    of the object first, so no fresh pages are allocated on the critical path.
    """

    def __init__(self, client: TransferClient, addr: Address, ref: ObjectRef) -> None:
        self.client, self.addr, self.ref = client, addr, ref
        self.where = f"{ref.relpath} on peer {_fmt(addr)}"
        self.bytes_received = 0
        total, head = client._get_range(addr, ref, 0, HEADER_SIZE, None)
        self.bytes_received += len(head)

        def read(offset: int, length: int, what: str) -> bytes:
            if offset == 0 and length <= len(head):
                return head[:length]
            _, raw = client._get_range(addr, ref, offset, length, None)
            self.bytes_received += len(raw)
            return raw

        self.header, self.index, self.skeleton = read_sections(read, total, self.where)
        if (self.index.job_id, self.index.step, self.index.rank) != (ref.job_id, ref.step,
                                                                     ref.rank):  # fmt: skip
            raise CorruptCheckpointError(f"{self.where}: holds another object")

    def read_all(
        self, targets: list[tuple[TensorEntry, memoryview]], threads: int
    ) -> list[TensorDamage]:
        """Receive every target's bytes into it and verify them; returns the damaged chunks."""
        n = max(1, min(self.client.connections, len(targets)))
        groups: list[list[tuple[TensorEntry, memoryview]]] = [[] for _ in range(n)]
        loads = [0] * n
        for e, out in sorted(targets, key=lambda t: -t[0].nbytes):
            i = loads.index(min(loads))
            groups[i].append((e, out))
            loads[i] += e.nbytes
        cs = self.index.chunk_size

        def receive(group: list[tuple[TensorEntry, memoryview]]) -> list[TensorDamage]:
            damage = []
            for e, out in group:
                if e.nbytes:
                    self.client._get_range(self.addr, self.ref, e.offset, e.nbytes, out)
                for i, c in enumerate(range(0, max(e.nbytes, 1), cs)):
                    if checksum(out[c : c + cs]) != e.checksums[i]:
                        damage.append(TensorDamage(e.name, i, c))
            return damage

        try:
            found = self.client._run_parts(lambda g, _: receive(groups[g]),
                                           [(g, 0) for g in range(n)])  # fmt: skip
        except (OSError, MemckptError) as e:
            raise TransferError(f"reading {self.where} failed: {e}") from e
        self.bytes_received += sum(loads)
        return [d for ds in found for d in ds]

    def close(self) -> None:
        pass

    def __enter__(self) -> RemoteObjectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
