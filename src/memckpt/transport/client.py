"""The client side of the transfer service: push replicas, fetch objects, list, ping.

A ``TransferClient`` keeps authenticated connections to each peer open and reuses
them. A large object moves as byte ranges over ``connections`` connections in
parallel: sent with ``sendfile`` straight from the object file, received with
``recv_into`` straight into a mapped pool buffer. A failed transfer is retried
from scratch (new connections, a new transfer id) with exponential backoff; the
final error names the peer, the object and every attempt's cause.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hmac
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from memckpt.core.faults import fault_point
from memckpt.core.format import (
    HEADER_SIZE,
    TensorEntry,
    checksum,
    read_header,
)
from memckpt.core.pool import Buffer
from memckpt.core.reader import TensorDamage, read_sections, verify_object_bytes
from memckpt.core.store import CheckpointStore
from memckpt.errors import (
    AuthenticationError,
    CorruptCheckpointError,
    InsufficientSpaceError,
    MemckptError,
    ProtocolError,
    TransferError,
)
from memckpt.transport.protocol import (
    MAX_DATA_LENGTH,
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

__all__ = ["Address", "RemoteObjectReader", "TransferClient", "parse_address"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Address = tuple[str, int]
_MIN_PART = 32 << 20
_PART_ALIGN = 1 << 20


def parse_address(text: str) -> Address:
    """``host:port`` or ``[v6]:port`` to a (host, port) tuple."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad peer address {text!r}; expected host:port or [v6addr]:port")
    return host.strip("[]"), int(port)


def _fmt(addr: Address) -> str:
    return format_address(*addr)


class _Connection:
    """One authenticated connection to a peer's server."""

    def __init__(self, addr: Address, job_id: str, secret: bytes, rank: int, timeout_s: float,
                 connect_timeout_s: float) -> None:  # fmt: skip
        self.addr = addr
        self.peer = _fmt(addr)
        self.sock = socket.create_connection(addr, timeout=connect_timeout_s)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(timeout_s)
            self._handshake(job_id, secret, rank)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, job_id: str, secret: bytes, rank: int) -> None:
        cnonce = make_nonce()
        send_frame(self.sock, MessageType.HELLO,
                   {"job_id": job_id, "rank": rank, "client_nonce": cnonce.hex()},
                   peer=self.peer)  # fmt: skip
        ch = self.expect(MessageType.CHALLENGE)
        snonce = parse_hex_field(ch.payload, "server_nonce", len(cnonce), peer=self.peer)
        tag = parse_hex_field(ch.payload, "server_tag", 32, peer=self.peer)
        if not hmac.compare_digest(tag, server_tag(secret, job_id, cnonce, snonce)):
            raise AuthenticationError(
                f"peer {self.peer} does not know the job secret of {job_id!r}; refusing to talk"
            )
        send_frame(self.sock, MessageType.AUTH,
                   {"client_tag": client_tag(secret, job_id, cnonce, snonce).hex()},
                   peer=self.peer)  # fmt: skip
        self.expect(MessageType.AUTH_OK)

    def expect(self, mtype: MessageType, max_data: int = 0) -> Any:
        frame = recv_frame(self.sock, peer=self.peer, max_data=max_data)
        if frame.type is MessageType.ERROR:
            message = str(frame.payload.get("message", ""))[:500]
            if mtype is MessageType.AUTH_OK:
                raise AuthenticationError(f"peer {self.peer} refused us: {message}")
            raise _RemoteError(f"peer {self.peer}: {message}")
        if frame.type is not mtype:
            raise ProtocolError(f"expected {mtype.name} from {self.peer}, got {frame.type.name}")
        return frame

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


class TransferClient:
    """Authenticated, pooled, parallel transfers to the servers of one job's ranks.

    Args:
        job_id, secret: must match the peer servers'.
        rank: this rank (sent in HELLO, for the peer's logs).
        connections: parallel connections per large object.
        timeout_s: per socket operation; connect_timeout_s for connecting.
        retries: attempts after the first, with backoff ``backoff_s * 3**i``.
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
        self._idle: dict[Address, list[_Connection]] = {}
        self._lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=4 * self.connections, thread_name_prefix=f"memckpt-xfer-r{rank}"
        )

    # -- connection pool -------------------------------------------------------------------
    def _checkout(self, addr: Address) -> _Connection:
        with self._lock:
            idle = self._idle.get(addr)
            if idle:
                return idle.pop()
        return _Connection(addr, self.job_id, self.secret, self.rank, self.timeout_s,
                           self.connect_timeout_s)  # fmt: skip

    def _checkin(self, conn: _Connection) -> None:
        with self._lock:
            self._idle.setdefault(conn.addr, []).append(conn)

    def _drop_idle(self, addr: Address) -> None:
        with self._lock:
            conns = self._idle.pop(addr, [])
        for c in conns:
            c.close()

    def _call(self, addr: Address, fn: Callable[[_Connection], T]) -> T:
        """Run one request on a pooled connection; a broken connection is closed, not reused."""
        conn = self._checkout(addr)
        try:
            result = fn(conn)
        except _RemoteError:
            self._checkin(conn)
            raise
        except BaseException:
            conn.close()
            raise
        self._checkin(conn)
        return result

    def _retrying(self, what: str, addr: Address, fn: Callable[[], T]) -> T:
        causes: list[str] = []
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except AuthenticationError as e:
                raise TransferError(f"{what} with peer {_fmt(addr)}: {e}") from e
            except (OSError, MemckptError) as e:
                causes.append(f"attempt {attempt + 1}: {type(e).__name__}: {e}")
                self._drop_idle(addr)
                if attempt < self.retries:
                    delay = self.backoff_s * 3**attempt
                    log.info("rank %d: %s with %s failed (%s); retrying in %.1fs", self.rank, what,
                             _fmt(addr), e, delay)  # fmt: skip
                    time.sleep(delay)
        raise TransferError(f"{what} with peer {_fmt(addr)} failed: " + "; ".join(causes))

    def _parts(self, total: int) -> list[tuple[int, int]]:
        n = max(1, min(self.connections, total // _MIN_PART))
        size = -(-total // n // _PART_ALIGN) * _PART_ALIGN
        return [(o, min(size, total - o)) for o in range(0, total, size)]

    # -- requests ----------------------------------------------------------------------------
    def ping(self, addr: Address) -> int:
        """Round trip to a peer; returns its rank."""

        def req(c: _Connection) -> int:
            send_frame(c.sock, MessageType.PING, {}, peer=c.peer)
            return int(c.expect(MessageType.OK).payload.get("rank", -1))

        return self._retrying("ping", addr, lambda: self._call(addr, req))

    def list(self, addr: Address) -> list[RemoteObject]:
        """The valid objects of this job the peer's node holds."""

        def req(c: _Connection) -> list[RemoteObject]:
            send_frame(c.sock, MessageType.LIST, {"job_id": self.job_id}, peer=c.peer)
            objs = c.expect(MessageType.OK).payload.get("objects")
            if not isinstance(objs, list):
                raise ProtocolError(f"LIST reply from {c.peer} has no object list")
            return [RemoteObject(int(s), int(r), int(n)) for s, r, n in objs]

        return self._retrying("list", addr, lambda: self._call(addr, req))

    def put(self, addr: Address, ref: ObjectRef, path: str | os.PathLike[str]) -> int:
        """Replicate the object file at ``path`` to the peer; returns the bytes sent.

        Returns only once the peer has verified and published the replica.
        """
        what = f"sending {ref.relpath}"
        return self._retrying(what, addr, lambda: self._put_once(addr, ref, Path(path)))

    def _put_once(self, addr: Address, ref: ObjectRef, path: Path) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            total = read_header(fd, str(path)).end
            tid = secrets.token_hex(16)
            parts = self._parts(total)

            def send_part(offset: int, nbytes: int) -> bool:
                def req(c: _Connection) -> bool:
                    send_frame(c.sock, MessageType.PUT,
                               {**ref.to_payload(), "offset": offset, "nbytes": nbytes,
                                "total": total, "transfer": tid}, peer=c.peer)  # fmt: skip
                    send_data_header(c.sock, nbytes, peer=c.peer)
                    half = nbytes // 2 if offset == 0 else 0  # a fault point sits there
                    sendfile_exact(c.sock, fd, offset, half, peer=c.peer)
                    fault_point("mid_replica_send", ref.step)
                    sendfile_exact(c.sock, fd, offset + half, nbytes - half, peer=c.peer)
                    return bool(c.expect(MessageType.OK).payload.get("complete"))

                return self._call(addr, req)

            done = self._run_parts(send_part, parts)
            if not any(done):
                raise ProtocolError(f"peer {_fmt(addr)} never confirmed {ref.relpath} complete")
            return total
        finally:
            os.close(fd)

    def _run_parts(self, fn: Callable[[int, int], T], parts: list[tuple[int, int]]) -> list[T]:
        if len(parts) == 1:
            return [fn(*parts[0])]
        futs = [self._executor.submit(fn, o, n) for o, n in parts]
        concurrent.futures.wait(futs)
        return [f.result() for f in futs]

    def get(self, addr: Address, ref: ObjectRef, store: CheckpointStore) -> tuple[Path, int]:
        """Fetch the object ``ref`` from the peer into ``store``; returns (path, bytes).

        The bytes land in a buffer of the store's pool, are verified, then renamed to
        their final name: nothing partial or corrupt is ever visible.
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
                self._get_range(addr, ref, offset, nbytes, view[offset : offset + nbytes])

            self._run_parts(get_part, self._parts(total))
            where = f"{ref.relpath} fetched from {_fmt(addr)}"
            _, index = verify_object_bytes(view[:total], where, threads=self.verify_threads)
            if (index.job_id, index.step, index.rank) != (ref.job_id, ref.step, ref.rank):
                raise CorruptCheckpointError(f"{where}: holds another object")
            path = store.adopt(ref.step, ref.rank, buf)
        except BaseException:
            store.pool.give_back(buf)
            raise
        return path, total

    def _get_range(
        self, addr: Address, ref: ObjectRef, offset: int, nbytes: int, into: memoryview | None
    ) -> tuple[int, bytes]:
        """GET bytes ``[offset, offset+nbytes)`` of an object; returns (object total, bytes).

        With ``into`` the bytes land there (``recv_into``) and b"" is returned.
        """

        def req(c: _Connection) -> tuple[int, bytes]:
            send_frame(c.sock, MessageType.GET,
                       {**ref.to_payload(), "offset": offset, "nbytes": nbytes},
                       peer=c.peer)  # fmt: skip
            total = parse_int_field(c.expect(MessageType.OK).payload, "total", peer=c.peer,
                                    maximum=MAX_DATA_LENGTH)  # fmt: skip
            head = c.expect(MessageType.DATA, max_data=nbytes)
            if head.length != nbytes:
                raise ProtocolError(f"{c.peer} sent {head.length} bytes, asked {nbytes}")
            if into is not None:
                recv_exact_into(c.sock, into, peer=c.peer)
                return total, b""
            raw = bytearray(nbytes)
            recv_exact_into(c.sock, memoryview(raw), peer=c.peer)
            return total, bytes(raw)

        return self._call(addr, req)

    def open_remote(self, addr: Address, ref: ObjectRef) -> RemoteObjectReader:
        """Read an object on a peer without storing it here (see RemoteObjectReader)."""
        what = f"opening {ref.relpath}"
        return self._retrying(what, addr, lambda: RemoteObjectReader(self, addr, ref))

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for c in conns:
                c.close()
        self._executor.shutdown(wait=True)

    def __enter__(self) -> TransferClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteObjectReader:
    """An object on a peer, read like ``memckpt.core.reader.ObjectReader`` (for ``load_object``).

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
