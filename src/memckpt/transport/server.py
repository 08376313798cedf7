"""The transfer server one rank runs: serves its node's objects and receives replicas.

Threads: one accepts connections, one per connection serves its requests (a peer
keeps a few connections open and reuses them across saves). Every socket has a
timeout; a connection that breaks a rule (bad frame, unknown type, wrong secret,
a path outside the job) gets an ERROR frame and is closed, and the server goes on
serving the others.

A replica arrives as one or more PUT parts (byte ranges, possibly on several
connections at once) into a buffer of the rank's pool, under the pool's own file
name. When the last byte has arrived the whole object is verified in memory, then
renamed to ``step-<N>/rank-<R>.mck``: a partial or corrupt replica is never visible.
Transfers whose sender vanished are reaped after ``transfer_timeout_s``.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from memckpt.core.faults import fault_point
from memckpt.core.format import HEADER_SIZE, read_header
from memckpt.core.pool import Buffer
from memckpt.core.reader import verify_object_bytes
from memckpt.core.store import CheckpointStore
from memckpt.errors import (
    CorruptCheckpointError,
    InsufficientSpaceError,
    InvalidNameError,
    MemckptError,
    PeerClosedError,
    ProtocolError,
)
from memckpt.transport.protocol import (
    MAX_DATA_LENGTH,
    NONCE_BYTES,
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

_MAX_CONNECTIONS = 64
_TRANSFER_ID_BYTES = 16


@dataclass(eq=False)
class _Transfer:
    """A replica being received, possibly over several connections."""

    ref: ObjectRef
    total: int
    buf: Buffer
    received: int = 0
    active: int = 0
    failed: bool = False
    touched: float = field(default_factory=time.monotonic)


class TransferServer:
    """Serves one rank's node directory to authenticated peers of the same job.

    Args:
        store: the rank's store; replicas go through its buffer pool into its tree.
        secret: the job secret (>= 16 bytes) every peer must prove it knows.
        host: address to bind and advertise (IPv4 or IPv6 literal, or a name).
        port: 0 picks a free port; ``address`` tells which.
        timeout_s: limit for each socket operation during a request.
        idle_timeout_s: a connection with no request for this long is closed.
        transfer_timeout_s: a partially received replica is dropped after this long idle.
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
    ) -> None:
        self.store = store
        self.job_id = store.job_id
        self.secret = validate_secret(secret)
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.verify_threads = verify_threads
        self._lock = threading.Lock()
        self._transfers: dict[tuple[str, ObjectRef], _Transfer] = {}
        self._conns: set[socket.socket] = set()
        self._closed = threading.Event()
        self.stats = {"connections": 0, "rejected": 0, "puts": 0, "gets": 0, "bytes_in": 0,
                      "bytes_out": 0}  # fmt: skip
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
        self._sock.listen(128)
        bound = self._sock.getsockname()
        self.host, self.port = bound[0], bound[1]
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"memckpt-server-r{store.rank}", daemon=True
        )
        self._thread.start()
        log.info("rank %d: transfer server on %s", store.rank, self.address)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

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
                too_many = len(self._conns) >= _MAX_CONNECTIONS
                if not too_many:
                    self._conns.add(conn)
            if too_many:
                log.warning("transfer server %s: refusing %s, too many connections", self.address,
                            peer)  # fmt: skip
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn, peer), name=f"memckpt-conn-{peer}", daemon=True
            ).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        self.stats["connections"] += 1
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.timeout_s)
            if not self._handshake(conn, peer):
                return
            while not self._closed.is_set():
                conn.settimeout(self.idle_timeout_s)
                try:
                    frame = recv_frame(conn, peer=peer)
                except PeerClosedError:
                    return
                conn.settimeout(self.timeout_s)
                self._dispatch(conn, peer, frame.type, frame.payload)
        except (ProtocolError, InvalidNameError) as e:
            self.stats["rejected"] += 1
            log.warning("transfer server %s: dropping %s: %s", self.address, peer, e)
            with contextlib.suppress(OSError, ProtocolError):
                send_frame(conn, MessageType.ERROR, {"message": str(e)}, peer=peer)
        except OSError as e:
            log.info("transfer server %s: connection from %s failed: %s", self.address, peer, e)
        except Exception:
            log.exception("transfer server %s: error serving %s", self.address, peer)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket, peer: str) -> bool:
        hello = recv_frame(conn, peer=peer)
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
        )
        auth = recv_frame(conn, peer=peer)
        if auth.type is not MessageType.AUTH:
            raise ProtocolError(f"expected AUTH from {peer}, got {auth.type.name}")
        tag = parse_hex_field(auth.payload, "client_tag", 32, peer=peer)
        if not hmac.compare_digest(tag, client_tag(self.secret, self.job_id, cnonce, snonce)):
            self.stats["rejected"] += 1
            log.warning("transfer server %s: %s failed authentication", self.address, peer)
            send_frame(conn, MessageType.ERROR, {"message": "authentication failed"}, peer=peer)
            return False
        send_frame(conn, MessageType.AUTH_OK, {}, peer=peer)
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
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
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
            send_frame(conn, MessageType.OK, {"nbytes": nbytes, "total": total}, peer=peer)
            send_data_header(conn, nbytes, peer=peer)
            sendfile_exact(conn, fd, offset, nbytes, peer=peer)
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
        self._reap_stale()
        try:
            tr = self._join_transfer(tid, ref, total)
        except InsufficientSpaceError as e:
            # refuse before the data: the sender learns why, the stream stays in sync
            self._drain(conn, peer, nbytes)
            send_frame(conn, MessageType.ERROR, {"message": str(e)}, peer=peer)
            return
        ok = False
        try:
            head = recv_frame(conn, peer=peer, max_data=nbytes)
            if head.type is not MessageType.DATA or head.length != nbytes:
                raise ProtocolError(
                    f"{peer}: PUT of {ref.relpath} announced {nbytes} bytes, then sent "
                    f"{head.type.name} of {head.length}"
                )
            view = tr.buf.memoryview()[offset : offset + nbytes]
            half = nbytes // 2 if offset == 0 else 0
            recv_exact_into(conn, view[:half], peer=peer)
            fault_point("mid_replica_recv", ref.step)
            recv_exact_into(conn, view[half:], peer=peer)
            view.release()
            self.stats["bytes_in"] += nbytes
            ok = True
        finally:
            complete = self._leave_transfer(tid, tr, nbytes if ok else None)
        if not complete:
            send_frame(conn, MessageType.OK, {"complete": False}, peer=peer)
            return
        try:
            self._publish(tr)
        except (CorruptCheckpointError, OSError) as e:
            self.store.pool.give_back(tr.buf)
            log.warning("transfer server %s: replica %s from %s rejected: %s", self.address,
                        ref.relpath, peer, e)  # fmt: skip
            send_frame(conn, MessageType.ERROR, {"message": f"replica rejected: {e}"}, peer=peer)
            return
        self.stats["puts"] += 1
        send_frame(conn, MessageType.OK, {"complete": True}, peer=peer)

    def _drain(self, conn: socket.socket, peer: str, nbytes: int) -> None:
        head = recv_frame(conn, peer=peer, max_data=nbytes)
        scratch = memoryview(bytearray(min(nbytes, 1 << 20) or 1))
        left = head.length
        while left:
            n = min(left, len(scratch))
            recv_exact_into(conn, scratch[:n], peer=peer)
            left -= n

    def _join_transfer(self, tid: str, ref: ObjectRef, total: int) -> _Transfer:
        key = (tid, ref)
        with self._lock:
            tr = self._transfers.get(key)
            if tr is not None:
                if tr.total != total or tr.failed:
                    raise ProtocolError(f"transfer {tid} of {ref.relpath} failed or changed size")
                tr.active += 1
                tr.touched = time.monotonic()
                return tr
        buf = self.store.pool.acquire(total)
        with self._lock:
            tr = self._transfers.get(key)
            if tr is None:
                tr = _Transfer(ref, total, buf)
                self._transfers[key] = tr
                buf = None  # type: ignore[assignment]
            tr.active += 1
        if buf is not None:  # another part created it meanwhile
            self.store.pool.give_back(buf)
        return tr

    def _leave_transfer(self, tid: str, tr: _Transfer, got: int | None) -> bool:
        """Account a finished part; True when this part completed the object."""
        release = False
        with self._lock:
            tr.active -= 1
            tr.touched = time.monotonic()
            if got is None:
                tr.failed = True
            else:
                tr.received += got
            done = not tr.failed and tr.received >= tr.total
            if done or (tr.failed and tr.active == 0):
                self._transfers.pop((tid, tr.ref), None)
                release = tr.failed
        if release:
            self.store.pool.give_back(tr.buf)
        return done

    def _publish(self, tr: _Transfer) -> None:
        where = f"replica {tr.ref.relpath} (received)"
        h, index = verify_object_bytes(
            tr.buf.memoryview()[: tr.total], where, threads=self.verify_threads
        )
        if (index.job_id, index.step, index.rank) != (tr.ref.job_id, tr.ref.step, tr.ref.rank):
            raise CorruptCheckpointError(
                f"{where}: its index says job {index.job_id!r} step {index.step} rank {index.rank}"
            )
        if h.end != tr.total:
            raise CorruptCheckpointError(f"{where}: object is {h.end} bytes, sent {tr.total}")
        self.store.adopt(tr.ref.step, tr.ref.rank, tr.buf)
        log.debug("rank %d: stored replica %s", self.store.rank, tr.ref.relpath)

    def _reap_stale(self) -> None:
        now = time.monotonic()
        stale = []
        with self._lock:
            for key, tr in list(self._transfers.items()):
                if tr.active == 0 and now - tr.touched > self.transfer_timeout_s:
                    stale.append(self._transfers.pop(key))
        for tr in stale:
            log.info("rank %d: dropping an abandoned transfer of %s", self.store.rank,
                     tr.ref.relpath)  # fmt: skip
            self.store.pool.give_back(tr.buf)

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
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        with self._lock:
            transfers, self._transfers = list(self._transfers.values()), {}
        for tr in transfers:
            if tr.active == 0:
                self.store.pool.give_back(tr.buf)

    def __enter__(self) -> TransferServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
