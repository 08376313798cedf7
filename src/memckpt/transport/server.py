"""The transfer server one rank runs: serves its node's objects and receives replicas.

Threads: one accepts connections, one per connection serves its requests (a peer
keeps a few connections open and reuses them across saves), one reaps abandoned
transfers. Every socket has a timeout and every exchange an overall deadline
(``memckpt.transport.protocol.Deadline``); a connection that breaks a rule (bad
frame, unknown type, wrong secret, a path outside the job) gets an ERROR frame and
is closed, and the server goes on serving the others.

Connections without the secret cannot lock peers out: the handshake must finish
within ``handshake_timeout_s`` with frames of at most ``MAX_HANDSHAKE_PAYLOAD``
bytes, at most ``max_unauthenticated`` connections may be in the handshake (a new
one evicts the oldest), and authenticated connections have their own budget
(``max_authenticated``) that unauthenticated ones never use.

A replica arrives as one or more PUT parts (disjoint byte ranges, possibly on
several connections at once) into a sparse buffer of the rank's pool: each part
allocates the pages of its own range when it arrives. A part that overlaps a range
already received or still arriving is refused, and so is any part of a transfer
that was published, failed or reaped. When the ranges cover the object and no part
is still writing, the object is verified in memory, then renamed to
``step-<N>/rank-<R>.mck``: a partial or corrupt replica is never visible, and a
published replica is never written or reused through its transfer. A transfer
with no part arriving for ``transfer_timeout_s`` is reaped by a timer; the buffer
of a failed or reaped transfer is deleted, giving its memory back.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from memckpt.errors import (
    CorruptCheckpointError,
    InsufficientSpaceError,
    InvalidNameError,
    MemckptError,
    PeerClosedError,
    ProtocolError,
)
from memckpt.storage.faults import fault_point
from memckpt.storage.format import HEADER_SIZE, read_header
from memckpt.storage.pool import Buffer, free_bytes
from memckpt.storage.reader import verify_object_bytes
from memckpt.storage.safe_fs import open_regular
from memckpt.storage.store import CheckpointStore
from memckpt.transport.protocol import (
    HANDSHAKE_TIMEOUT_S,
    MAX_DATA_LENGTH,
    MAX_HANDSHAKE_PAYLOAD,
    MAX_UNAUTHENTICATED,
    MIN_THROUGHPUT,
    NONCE_BYTES,
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
    resolve_object_path,
    send_data_header,
    send_frame,
    sendfile_exact,
    server_tag,
    validate_secret,
)

__all__ = ["TransferServer", "format_address"]

log = logging.getLogger(__name__)

_MAX_AUTHENTICATED = 128
_TRANSFER_ID_BYTES = 16
_MAX_PENDING_TRANSFERS = 64  # unfinished replicas one server holds at once
_MAX_RANGES = 1024  # disjoint received ranges one transfer may hold
_FINISHED_MEMORY = 4096  # ended transfer ids remembered, so their late parts are refused
_EVICTION_REPORT_S = 60.0
_ERROR_REPLY_S = 2.0  # an ERROR frame is small; a peer that does not read it is not waited for


class _PartRefused(MemckptError):
    """A PUT part the server will not write; its bytes are read and dropped, then ERROR."""


@dataclass(eq=False)
class _Transfer:
    """A replica being received, possibly over several connections."""

    tid: str
    ref: ObjectRef
    total: int
    buf: Buffer
    received: int = 0  # bytes in ``done``
    done: list[tuple[int, int]] = field(default_factory=list)  # sorted, merged
    arriving: dict[int, tuple[int, int]] = field(default_factory=dict)  # part id -> range
    failed: str = ""  # why, once a part failed
    touched: float = field(default_factory=time.monotonic)

    def clash(self, start: int, end: int) -> tuple[int, int] | None:
        """A received or arriving range that ``[start, end)`` overlaps, if any."""
        if start == end:
            return None
        for s, e in (*self.done, *self.arriving.values()):
            if s < end and start < e:
                return s, e
        return None

    def add_done(self, start: int, end: int) -> None:
        if start == end:
            return
        self.received += end - start
        merged: list[tuple[int, int]] = []
        for s, e in sorted([*self.done, (start, end)]):
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self.done = merged


class TransferServer:
    """Serves one rank's node directory to authenticated peers of the same job.

    Args:
        store: the rank's store; replicas go through its buffer pool into its tree.
        secret: the job secret (>= 16 bytes) every peer must prove it knows.
        host: address to bind and advertise (IPv4 or IPv6 literal, or a name).
        port: 0 picks a free port; ``address`` tells which.
        timeout_s: limit for each socket operation during a request, and the base of
            each request's overall deadline (``timeout_s + nbytes / min_throughput``).
        idle_timeout_s: a connection with no request for this long is closed.
        transfer_timeout_s: a partially received replica is dropped after this long idle.
        handshake_timeout_s: the whole handshake must finish within this (default
            ``min(timeout_s, HANDSHAKE_TIMEOUT_S)``).
        min_throughput: bytes per second below which a request misses its deadline.
        max_unauthenticated: connections in the handshake; a new one evicts the oldest.
        max_authenticated: authenticated connections; more are refused with ERROR.
    """

    def __init__(
        self,
        store: CheckpointStore,
        secret: bytes,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout_s: float = 30.0,
        idle_timeout_s: float = 600.0,
        transfer_timeout_s: float = 120.0,
        verify_threads: int = 2,
        handshake_timeout_s: float | None = None,
        min_throughput: float = MIN_THROUGHPUT,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
        max_authenticated: int = _MAX_AUTHENTICATED,
    ) -> None:
        self.store = store
        self.job_id = store.job_id
        self.secret = validate_secret(secret)
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.verify_threads = verify_threads
        self.handshake_timeout_s = (
            min(timeout_s, HANDSHAKE_TIMEOUT_S) if handshake_timeout_s is None
            else handshake_timeout_s
        )  # fmt: skip
        self.min_throughput = min_throughput
        self.max_unauthenticated = max(1, max_unauthenticated)
        self.max_authenticated = max(1, max_authenticated)
        self._lock = threading.Lock()
        self._transfers: dict[str, _Transfer] = {}
        self._finished: OrderedDict[str, str] = OrderedDict()  # transfer id -> how it ended
        self._part_ids = itertools.count()
        # connections in the handshake, oldest first (conn -> peer), and authenticated ones;
        # a connection is closed under _lock, so an eviction never hits a reused descriptor
        self._unauth: OrderedDict[socket.socket, str] = OrderedDict()
        self._auth: set[socket.socket] = set()
        self._evictions_unreported = 0
        self._last_eviction_report = -_EVICTION_REPORT_S
        self._closed = threading.Event()
        self.stats = {"connections": 0, "rejected": 0, "puts": 0, "gets": 0, "bytes_in": 0,
                      "bytes_out": 0, "evicted": 0, "refused_parts": 0,
                      "reaped": 0}  # fmt: skip
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind(sockaddr)
        except OSError as e:
            self._sock.close()
            raise MemckptError(
                f"rank {store.rank}: cannot bind the transfer server to "
                f"{format_address(host, port)}: {e}; pick another port or address"
            ) from e
        self._sock.listen(512)
        bound = self._sock.getsockname()
        self.host, self.port = bound[0], bound[1]
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"memckpt-server-r{store.rank}", daemon=True
        )
        self._thread.start()
        self._reaper = threading.Thread(
            target=self._reap_loop, name=f"memckpt-reaper-r{store.rank}", daemon=True
        )
        self._reaper.start()
        log.info("rank %d: transfer server on %s", store.rank, self.address)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def connection_counts(self) -> tuple[int, int]:
        """(connections in the handshake, authenticated connections) now open."""
        with self._lock:
            return len(self._unauth), len(self._auth)

    # -- connections -------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.01)
                continue
            peer = format_address(str(addr[0]), int(addr[1]))
            with self._lock:
                if len(self._unauth) >= self.max_unauthenticated:
                    self._evict_oldest_locked()
                self._unauth[conn] = peer
            try:
                threading.Thread(
                    target=self._serve, args=(conn, peer), name=f"memckpt-conn-{peer}", daemon=True
                ).start()
            except RuntimeError as e:  # no thread to be had: refuse this one, keep serving
                log.warning("transfer server %s: refusing %s: %s", self.address, peer, e)
                with self._lock:
                    self._unauth.pop(conn, None)
                    conn.close()

    def _evict_oldest_locked(self) -> None:
        victim, peer = self._unauth.popitem(last=False)
        with contextlib.suppress(OSError):  # its thread wakes up, sees EOF and closes it
            victim.shutdown(socket.SHUT_RDWR)
        self.stats["evicted"] += 1
        self._evictions_unreported += 1
        now = time.monotonic()
        log.debug("transfer server %s: evicted unauthenticated connection from %s",
                  self.address, peer)  # fmt: skip
        if now - self._last_eviction_report >= _EVICTION_REPORT_S:
            log.warning(
                "transfer server %s: evicted %d connection(s) that had not authenticated "
                "(the last from %s) to keep at most %d in the handshake: something without "
                "the job secret is holding connections open; firewall the transfer port",
                self.address, self._evictions_unreported, peer, self.max_unauthenticated,
            )  # fmt: skip
            self._evictions_unreported = 0
            self._last_eviction_report = now

    def _serve(self, conn: socket.socket, peer: str) -> None:
        self.stats["connections"] += 1
        authenticated = False
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.timeout_s)
            if not self._handshake(conn, peer):
                return
            authenticated = True
            while not self._closed.is_set():
                if not self._wait_request(conn):
                    log.debug("transfer server %s: closing %s, idle for %.0fs", self.address,
                              peer, self.idle_timeout_s)  # fmt: skip
                    return
                try:
                    frame = recv_frame(conn, peer=peer,
                                       deadline=Deadline(self.timeout_s, "request"))  # fmt: skip
                except PeerClosedError:
                    return
                self._dispatch(conn, peer, frame.type, frame.payload)
        except PeerClosedError:
            return  # closed (or evicted) between frames
        except (ProtocolError, InvalidNameError) as e:
            self.stats["rejected"] += 1
            if authenticated:
                log.warning("transfer server %s: dropping %s: %s", self.address, peer, e)
            else:  # unauthenticated noise must not flood the log
                log.debug("transfer server %s: dropping %s in the handshake: %s",
                          self.address, peer, e)  # fmt: skip
            text = str(e) if authenticated else str(e)[: MAX_HANDSHAKE_PAYLOAD // 2]
            with contextlib.suppress(OSError, ProtocolError):
                send_frame(conn, MessageType.ERROR, {"message": text}, peer=peer,
                           deadline=Deadline(_ERROR_REPLY_S, "error reply"))  # fmt: skip
        except OSError as e:
            log.info("transfer server %s: connection from %s failed: %s", self.address, peer, e)
        except Exception:
            log.exception("transfer server %s: error serving %s", self.address, peer)
        finally:
            with self._lock:
                self._unauth.pop(conn, None)
                self._auth.discard(conn)
                conn.close()

    def _wait_request(self, conn: socket.socket) -> bool:
        """Wait up to ``idle_timeout_s`` for the next request to start arriving."""
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        return bool(poller.poll(int(self.idle_timeout_s * 1000)))

    def _handshake(self, conn: socket.socket, peer: str) -> bool:
        """Authenticate the peer within the handshake deadline; True once AUTH_OK is sent."""
        deadline = Deadline(self.handshake_timeout_s, "handshake")
        hello = recv_frame(conn, MAX_HANDSHAKE_PAYLOAD, peer=peer, deadline=deadline)
        if hello.type is not MessageType.HELLO:
            raise ProtocolError(f"expected HELLO from {peer}, got {hello.type.name}")
        if hello.payload.get("job_id") != self.job_id:
            raise ProtocolError(
                f"{peer} asks for job {str(hello.payload.get('job_id'))[:80]!r}; "
                f"this server serves job {self.job_id!r}"
            )
        cnonce = parse_hex_field(hello.payload, "client_nonce", NONCE_BYTES, peer=peer)
        snonce = make_nonce()
        send_frame(
            conn,
            MessageType.CHALLENGE,
            {
                "server_nonce": snonce.hex(),
                "server_tag": server_tag(self.secret, self.job_id, cnonce, snonce).hex(),
            },
            peer=peer,
            deadline=deadline,
        )
        auth = recv_frame(conn, MAX_HANDSHAKE_PAYLOAD, peer=peer, deadline=deadline)
        if auth.type is not MessageType.AUTH:
            raise ProtocolError(f"expected AUTH from {peer}, got {auth.type.name}")
        tag = parse_hex_field(auth.payload, "client_tag", 32, peer=peer)
        if not hmac.compare_digest(tag, client_tag(self.secret, self.job_id, cnonce, snonce)):
            self.stats["rejected"] += 1
            log.warning("transfer server %s: %s failed authentication", self.address, peer)
            send_frame(conn, MessageType.ERROR, {"message": "authentication failed"}, peer=peer,
                       deadline=deadline)  # fmt: skip
            return False
        with self._lock:
            evicted = conn not in self._unauth
            full = not evicted and len(self._auth) >= self.max_authenticated
            if not evicted and not full:
                del self._unauth[conn]
                self._auth.add(conn)
        if evicted:
            return False
        if full:
            log.warning("transfer server %s: refusing %s: %d authenticated connections open",
                        self.address, peer, self.max_authenticated)  # fmt: skip
            send_frame(conn, MessageType.ERROR,
                       {"message": f"server {self.address} already serves "
                                   f"{self.max_authenticated} authenticated connections; "
                                   "retry later or close idle clients"},
                       peer=peer, deadline=deadline)  # fmt: skip
            return False
        send_frame(conn, MessageType.AUTH_OK, {}, peer=peer, deadline=deadline)
        return True

    def _dispatch(
        self, conn: socket.socket, peer: str, mtype: MessageType, payload: dict[str, Any]
    ) -> None:
        if mtype is MessageType.PING:
            send_frame(conn, MessageType.OK, {"rank": self.store.rank}, peer=peer)
        elif mtype is MessageType.LIST:
            self._check_job(payload, peer)
            send_frame(conn, MessageType.OK, {"objects": self._list()}, peer=peer)
        elif mtype is MessageType.GET:
            self._get(conn, peer, payload)
        elif mtype is MessageType.PUT:
            self._put(conn, peer, payload)
        else:
            raise ProtocolError(f"{peer} sent a {mtype.name} frame where a request belongs")

    def _check_job(self, payload: dict[str, Any], peer: str) -> None:
        if payload.get("job_id") != self.job_id:
            raise ProtocolError(f"{peer} names job {str(payload.get('job_id'))[:80]!r}, "
                                f"not {self.job_id!r}")  # fmt: skip

    def _list(self) -> list[list[int]]:
        return [
            [o.step, o.rank, o.size]
            for step in self.store.steps()
            for o in self.store.objects(step, validate=True)
        ]

    # -- GET -----------------------------------------------------------------------------
    def _get(self, conn: socket.socket, peer: str, payload: dict[str, Any]) -> None:
        ref = ObjectRef.from_payload(payload, peer=peer)
        self._check_job(payload, peer)
        path = resolve_object_path(self.store.base_dir, ref.job_id, ref.step, ref.rank)
        try:
            fd = open_regular(path, "object")  # never a symlink, FIFO or device
        except CorruptCheckpointError as e:
            send_frame(conn, MessageType.ERROR, {"message": str(e)}, peer=peer)
            return
        if fd is None:
            send_frame(conn, MessageType.ERROR, {"message": f"no object {ref.relpath} here"},
                       peer=peer)  # fmt: skip
            return
        try:
            try:
                total = read_header(fd, str(path)).end
            except CorruptCheckpointError as e:
                send_frame(conn, MessageType.ERROR, {"message": str(e)}, peer=peer)
                return
            offset = parse_int_field(payload, "offset", peer=peer) if "offset" in payload else 0
            nbytes = (
                parse_int_field(payload, "nbytes", peer=peer)
                if "nbytes" in payload
                else total - offset
            )
            if offset + nbytes > total:
                raise ProtocolError(
                    f"{peer} asks for bytes {offset}..{offset + nbytes} of {ref.relpath}, "
                    f"which has {total}"
                )
            deadline = Deadline.for_transfer(
                self.timeout_s, nbytes, self.min_throughput,
                f"GET of {ref.relpath} bytes {offset}..{offset + nbytes}",
            )  # fmt: skip
            send_frame(conn, MessageType.OK, {"nbytes": nbytes, "total": total}, peer=peer,
                       deadline=deadline)  # fmt: skip
            send_data_header(conn, nbytes, peer=peer, deadline=deadline)
            sendfile_exact(conn, fd, offset, nbytes, peer=peer, deadline=deadline)
            self.stats["gets"] += 1
            self.stats["bytes_out"] += nbytes
        finally:
            os.close(fd)

    # -- PUT -----------------------------------------------------------------------------
    def _put(self, conn: socket.socket, peer: str, payload: dict[str, Any]) -> None:
        ref = ObjectRef.from_payload(payload, peer=peer)
        self._check_job(payload, peer)
        if ref.rank == self.store.rank:
            raise ProtocolError(f"{peer} tried to overwrite rank {ref.rank}'s own object")
        resolve_object_path(self.store.base_dir, ref.job_id, ref.step, ref.rank)  # path check
        total = parse_int_field(payload, "total", peer=peer, maximum=MAX_DATA_LENGTH)
        offset = parse_int_field(payload, "offset", peer=peer, maximum=MAX_DATA_LENGTH)
        nbytes = parse_int_field(payload, "nbytes", peer=peer, maximum=MAX_DATA_LENGTH)
        tid = parse_hex_field(payload, "transfer", _TRANSFER_ID_BYTES, peer=peer).hex()
        if total < HEADER_SIZE or offset + nbytes > total:
            raise ProtocolError(
                f"{peer}: PUT of {ref.relpath} bytes {offset}..{offset + nbytes} of {total} "
                "is out of range"
            )
        deadline = Deadline.for_transfer(
            self.timeout_s, nbytes, self.min_throughput,
            f"PUT of {ref.relpath} bytes {offset}..{offset + nbytes}",
        )  # fmt: skip
        try:
            tr, part = self._join_part(tid, ref, total, offset, nbytes, peer)
        except _PartRefused as e:
            # refuse after reading the part: the sender learns why, the stream stays in sync
            self.stats["refused_parts"] += 1
            log.warning("transfer server %s: %s", self.address, e)
            self._drain(conn, peer, nbytes, deadline)
            send_frame(conn, MessageType.ERROR, {"message": str(e)}, peer=peer, deadline=deadline)
            return
        ok = False
        no_room = ""
        try:
            try:
                self.store.pool.reserve(tr.buf, offset, offset + nbytes)
            except InsufficientSpaceError as e:
                log.debug("rank %d: reserving a replica range failed: %s", self.store.rank, e)
                no_room = self._no_room(ref, total, peer)
                self._drain(conn, peer, nbytes, deadline)
            else:
                self._receive_part(conn, peer, tr, offset, nbytes, deadline)
                self.stats["bytes_in"] += nbytes
                ok = True
        finally:
            publish = self._leave_part(tr, part, ok, no_room or f"a part from {peer} failed")
        if no_room:
            send_frame(conn, MessageType.ERROR, {"message": no_room}, peer=peer, deadline=deadline)
            return
        if not publish:
            send_frame(conn, MessageType.OK, {"complete": False}, peer=peer, deadline=deadline)
            return
        try:
            self._publish(tr)
        except (CorruptCheckpointError, OSError) as e:
            with self._lock:
                self._finish_locked(tid, "rejected")
            if tr.buf.path.parent == self.store.pool.dir:  # not renamed: never visible
                self.store.pool.discard(tr.buf)
            log.warning("transfer server %s: replica %s from %s rejected: %s", self.address,
                        ref.relpath, peer, e)  # fmt: skip
            send_frame(conn, MessageType.ERROR, {"message": f"replica rejected: {e}"}, peer=peer,
                       deadline=deadline)  # fmt: skip
            return
        self.stats["puts"] += 1
        send_frame(conn, MessageType.OK, {"complete": True}, peer=peer, deadline=deadline)

    def _receive_part(self, conn: socket.socket, peer: str, tr: _Transfer, offset: int,
                      nbytes: int, deadline: Deadline) -> None:  # fmt: skip
        head = recv_frame(conn, peer=peer, max_data=nbytes, deadline=deadline)
        if head.type is not MessageType.DATA or head.length != nbytes:
            raise ProtocolError(
                f"{peer}: PUT of {tr.ref.relpath} announced {nbytes} bytes, then sent "
                f"{head.type.name} of {head.length}"
            )
        with tr.buf.memoryview() as whole, whole[offset : offset + nbytes] as view:
            half = nbytes // 2 if offset == 0 else 0
            recv_exact_into(conn, view[:half], peer=peer, deadline=deadline)
            fault_point("mid_replica_recv", tr.ref.step)
            recv_exact_into(conn, view[half:], peer=peer, deadline=deadline)

    def _drain(self, conn: socket.socket, peer: str, nbytes: int, deadline: Deadline) -> None:
        head = recv_frame(conn, peer=peer, max_data=nbytes, deadline=deadline)
        scratch = memoryview(bytearray(min(nbytes, 1 << 20) or 1))
        left = head.length
        while left:
            n = min(left, len(scratch))
            recv_exact_into(conn, scratch[:n], peer=peer, deadline=deadline)
            left -= n

    def _no_room(self, ref: ObjectRef, total: int, peer: str) -> str:
        pool = self.store.pool
        room = f"{free_bytes(pool.dir)} bytes free at {pool.dir}"
        if pool.limit_bytes is not None:
            room += (f", and this rank's buffers already hold {pool.owned_bytes()} of their "
                     f"{pool.limit_bytes} byte limit (limit_bytes)")  # fmt: skip
        return (
            f"rank {self.store.rank} has no room for replica {ref.relpath} ({total} bytes) "
            f"from peer {peer}: {room}; free space on that node, lower keep_last, or raise "
            "its limit_bytes"
        )

    def _join_part(self, tid: str, ref: ObjectRef, total: int, offset: int, nbytes: int,
                   peer: str) -> tuple[_Transfer, int]:  # fmt: skip
        """Register an arriving part; raises _PartRefused when it may not be written."""
        where = (
            f"PUT part {offset}..{offset + nbytes} of {ref.relpath} (transfer {tid}) from {peer}"
        )
        with self._lock:
            ended = self._finished.get(tid)
            if ended is not None:
                raise _PartRefused(f"{where} refused: that transfer is already {ended}; "
                                   "send the object again under a new transfer id")  # fmt: skip
            tr = self._transfers.get(tid)
            if tr is None and len(self._transfers) >= _MAX_PENDING_TRANSFERS:
                raise _PartRefused(
                    f"{where} refused: {len(self._transfers)} transfers are unfinished here "
                    f"(at most {_MAX_PENDING_TRANSFERS}); finish or abandon one first"
                )
            if tr is None:
                try:
                    buf = self.store.pool.acquire_sparse(total)
                except InsufficientSpaceError as e:
                    log.debug("rank %d: no buffer for a replica: %s", self.store.rank, e)
                    self._finish_locked(tid, "refused for lack of space")
                    raise _PartRefused(self._no_room(ref, total, peer)) from e
                tr = _Transfer(tid, ref, total, buf)
                self._transfers[tid] = tr
            elif tr.ref != ref or tr.total != total:
                raise _PartRefused(
                    f"{where} refused: transfer {tid} carries {tr.ref.relpath} of {tr.total} "
                    f"bytes, not {ref.relpath} of {total}; use one transfer id per object"
                )
            elif tr.failed:
                raise _PartRefused(f"{where} refused: the transfer already failed "
                                   f"({tr.failed}); send the object again")  # fmt: skip
            clash = tr.clash(offset, offset + nbytes)
            if clash is not None:
                raise _PartRefused(
                    f"{where} refused: it overlaps bytes {clash[0]}..{clash[1]}, already "
                    "received or still arriving; parts of one transfer must not overlap"
                )
            if len(tr.done) + len(tr.arriving) >= _MAX_RANGES:
                raise _PartRefused(f"{where} refused: the transfer is split into more than "
                                   f"{_MAX_RANGES} ranges; send larger parts")  # fmt: skip
            part = next(self._part_ids)
            tr.arriving[part] = (offset, offset + nbytes)
            tr.touched = time.monotonic()
        return tr, part

    def _leave_part(self, tr: _Transfer, part: int, ok: bool, why: str) -> bool:
        """Account a finished part; True when the transfer is complete and this part publishes.

        A transfer ends (complete or failed) only when no part is still writing into its
        buffer; from then on its id is refused, so nothing can write into a published
        replica or hand its buffer back.
        """
        discard = publish = False
        with self._lock:
            start, end = tr.arriving.pop(part)
            tr.touched = time.monotonic()
            if not ok and not tr.failed:
                tr.failed = why
            elif ok and not tr.failed:
                tr.add_done(start, end)
            if tr.arriving:
                return False
            if tr.failed:
                self._transfers.pop(tr.tid, None)
                self._finish_locked(tr.tid, "failed")
                discard = True
            elif tr.received == tr.total:
                self._transfers.pop(tr.tid, None)
                self._finish_locked(tr.tid, "published")
                publish = True
        if discard:
            log.info("rank %d: dropped the transfer of replica %s: %s", self.store.rank,
                     tr.ref.relpath, tr.failed)  # fmt: skip
            self.store.pool.discard(tr.buf)
        return publish

    def _finish_locked(self, tid: str, how: str) -> None:
        self._finished[tid] = how
        self._finished.move_to_end(tid)
        while len(self._finished) > _FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def _publish(self, tr: _Transfer) -> None:
        where = f"replica {tr.ref.relpath} (received)"
        with tr.buf.memoryview() as whole, whole[: tr.total] as data:
            h, index = verify_object_bytes(data, where, threads=self.verify_threads)
        if (index.job_id, index.step, index.rank) != (tr.ref.job_id, tr.ref.step, tr.ref.rank):
            raise CorruptCheckpointError(
                f"{where}: its index says job {index.job_id!r} step {index.step} rank {index.rank}"
            )
        if h.end != tr.total:
            raise CorruptCheckpointError(f"{where}: object is {h.end} bytes, sent {tr.total}")
        self.store.adopt(tr.ref.step, tr.ref.rank, tr.buf)
        log.debug("rank %d: stored replica %s", self.store.rank, tr.ref.relpath)

    # -- reaping -------------------------------------------------------------------------
    def _reap_loop(self) -> None:
        interval = max(0.05, min(5.0, self.transfer_timeout_s / 4))
        while not self._closed.wait(interval):
            try:
                self._reap_stale()
            except Exception:
                log.exception("rank %d: reaping abandoned transfers failed", self.store.rank)

    def _reap_stale(self) -> None:
        now = time.monotonic()
        stale = []
        with self._lock:
            for tid, tr in list(self._transfers.items()):
                if not tr.arriving and now - tr.touched > self.transfer_timeout_s:
                    stale.append(self._transfers.pop(tid))
                    self._finish_locked(tid, "abandoned")
        for tr in stale:
            self.stats["reaped"] += 1
            log.info("rank %d: dropping the abandoned transfer of replica %s (%d of %d bytes "
                     "arrived, none for %.0fs)", self.store.rank, tr.ref.relpath, tr.received,
                     tr.total, self.transfer_timeout_s)  # fmt: skip
            self.store.pool.discard(tr.buf)

    def pending_transfers(self) -> int:
        with self._lock:
            return len(self._transfers)

    # -- shutdown --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop accepting, close every connection, drop partial transfers."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            for c in (*self._unauth, *self._auth):
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._reaper.join(timeout=5)
        with self._lock:
            idle = [tr for tr in self._transfers.values() if not tr.arriving]
            for tr in idle:  # transfers with a part arriving are dropped when it fails
                self._transfers.pop(tr.tid)
                self._finish_locked(tr.tid, "abandoned")
        for tr in idle:
            self.store.pool.discard(tr.buf)

    def __enter__(self) -> TransferServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
