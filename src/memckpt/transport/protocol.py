"""Wire format of the peer transfer service: framing, message schemas, authentication.

This module holds the wire format and nothing else: no server, no retries.

Every message is a frame: a 16-byte header in network byte order, then a payload.

======  =====  ====================================================================
offset  size   field
======  =====  ====================================================================
0       4      magic ``b"MCKP"``
4       1      protocol version (u8), currently 1; a peer speaking another is refused
5       1      message type (u8), one of :class:`MessageType`
6       2      flags (u16); no flag is defined in version 1, so it must be 0
8       8      payload length in bytes (u64)
======  =====  ====================================================================

Control frames (every type but DATA) carry a JSON object encoded as UTF-8, at most
``MAX_CONTROL_PAYLOAD`` bytes; the receiver checks the length before allocating.
A DATA frame announces a raw byte stream: its length field is the byte count,
which must equal the ``nbytes`` of the control message before it, and the bytes
follow unframed so the sender can ``sendfile`` and the receiver can ``recv_into``
a mapped buffer. :func:`recv_frame` returns a DATA frame after its header; the
caller reads the bytes with :func:`recv_exact_into`.

Session (client C, server S), each step one frame::

    C->S HELLO      {"job_id", "rank", "client_nonce"}
    S->C CHALLENGE  {"server_nonce", "server_tag"}   server proves it knows the secret
    C->S AUTH       {"client_tag"}                   client proves it knows the secret
    S->C AUTH_OK    {}                               or ERROR, then S closes
    then any number of requests:
    C->S PUT        {"job_id", "step", "rank", "offset", "nbytes", "total", "transfer"},
                    then DATA of nbytes          -> S->C OK {"complete": bool} | ERROR
    C->S GET        {"job_id", "step", "rank"[, "offset", "nbytes"]}
                                                -> S->C OK {"nbytes", "total"}, DATA | ERROR
    C->S LIST       {"job_id"}                  -> S->C OK {"objects": [[step, rank, size], ...]}
    C->S PING       {}                          -> S->C OK {"rank"}
    ERROR           {"message": str}

A large object moves as byte ranges on several connections at once: PUT parts share
a random ``transfer`` id (16 bytes, hex) and the object's ``total`` length; the part
that completes the object gets ``complete: true`` once the server has verified it
and made it visible. GET takes an optional byte range; ``nbytes: 0`` asks only for
the object's ``total`` length.

Parts of one transfer must not overlap: the server refuses (ERROR, after reading
and discarding the part's bytes) a part whose range overlaps one already received
or still arriving, a part whose ``job_id``/``step``/``rank``/``total`` differ from
the transfer's, and any part of a transfer id that was published, failed or
reaped. It publishes only when the received ranges cover ``[0, total)`` and no
part is still being written. Each part's pages are allocated when the part
arrives, not up front; a transfer with no part arriving for the server's
``transfer_timeout_s`` is reaped by a timer and its memory given back.

Nonces and tags travel as lowercase hex. Tags are HMAC-SHA256 with the job secret
over length-prefixed parts (:func:`auth_tag`); the server and client tags use
different role labels so neither can be replayed as the other. Requests name an
object by (job_id, step, rank), never by path (:class:`ObjectRef`).

Time limits. Every socket has a per-operation timeout (``timeout_s``), and every
exchange also has an overall :class:`Deadline` that holds across all its receives
and sends, so a peer trickling one byte at a time cannot stretch it:

- the handshake, on both sides: the server closes a connection that has not
  authenticated within ``handshake_timeout_s`` (``HANDSHAKE_TIMEOUT_S``); the
  client gives the whole handshake ``timeout_s``.
- each request: ``timeout_s + nbytes / min_throughput`` (``MIN_THROUGHPUT``,
  64 MiB/s by default), where ``nbytes`` is the data the request moves.

Unauthenticated phase. Until AUTH_OK, every frame (HELLO, CHALLENGE, AUTH, AUTH_OK,
ERROR) is at most ``MAX_HANDSHAKE_PAYLOAD`` bytes; the client reads the server's
CHALLENGE under that limit too, before it has checked the server's tag. A server
keeps at most ``MAX_UNAUTHENTICATED`` connections in the handshake; a new one
evicts the oldest. Authenticated connections have their own budget, so
connections without the secret never starve pushes and fetches.

Client circuit breaker. A peer whose attempts failed (connection, timeout,
deadline, protocol or authentication errors; not ERROR answers) ``N`` times in a
row is skipped for a cool-off period: calls fail at once with "skipped: peer X
failed N times in a row, next try in T s". One success closes the breaker.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import select
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from memckpt import settings
from memckpt.errors import (
    AuthenticationError,
    InvalidNameError,
    PeerClosedError,
    ProtocolError,
)
from memckpt.ids import (
    JobLayout,
    validate_job_id,
    validate_rank,
    validate_step,
)
from memckpt.settings import SECRET_ENV

__all__ = [
    "CLIENT_ROLE",
    "HANDSHAKE_TIMEOUT_S",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CONTROL_PAYLOAD",
    "MAX_DATA_LENGTH",
    "MAX_HANDSHAKE_PAYLOAD",
    "MAX_UNAUTHENTICATED",
    "MIN_SECRET_BYTES",
    "MIN_THROUGHPUT",
    "NONCE_BYTES",
    "PROTOCOL_VERSION",
    "SECRET_ENV",
    "SERVER_ROLE",
    "AuthenticationError",
    "Deadline",
    "Frame",
    "MessageType",
    "ObjectRef",
    "PeerClosedError",
    "ProtocolError",
    "auth_tag",
    "client_tag",
    "decode_control_payload",
    "decode_frame",
    "decode_header",
    "encode_control_payload",
    "encode_data_header",
    "encode_frame",
    "encode_header",
    "format_address",
    "generate_secret",
    "make_nonce",
    "object_relpath",
    "parse_hex_field",
    "parse_int_field",
    "recv_exact_into",
    "recv_frame",
    "resolve_object_path",
    "secret_from_env",
    "send_data_header",
    "send_frame",
    "sendfile_exact",
    "server_tag",
    "validate_secret",
    "verify_tag",
]

logger = logging.getLogger(__name__)

MAGIC: Final = b"MCKP"
PROTOCOL_VERSION: Final = 1
HEADER: Final = struct.Struct("!4sBBHQ")
HEADER_SIZE: Final = HEADER.size
MAX_CONTROL_PAYLOAD: Final = 1 << 20
MAX_DATA_LENGTH: Final = 1 << 48
# HELLO is ~250 bytes with the longest job id; nothing before AUTH_OK needs more
MAX_HANDSHAKE_PAYLOAD: Final = 1024
HANDSHAKE_TIMEOUT_S: Final = 10.0
MAX_UNAUTHENTICATED: Final = 32
MIN_THROUGHPUT: Final = 64 << 20  # bytes per second a transfer may not fall below
NONCE_BYTES: Final = 32
MIN_SECRET_BYTES: Final = 16
SERVER_ROLE: Final = b"memckpt-server-v1"
CLIENT_ROLE: Final = b"memckpt-client-v1"
_KNOWN_FLAGS: Final = 0
_HEX_RE: Final = re.compile(r"(?:[0-9a-fA-F]{2})+")
_MAX_RANK: Final = 10**9 - 1  # ids.parse_object_name reads at most 9 digits


class MessageType(enum.IntEnum):
    """Message type byte of a frame header."""

    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    AUTH_OK = 4
    PUT = 5
    GET = 6
    LIST = 7
    PING = 8
    OK = 9
    ERROR = 10
    DATA = 11


def _from(peer: str | None) -> str:
    return f" from peer {peer}" if peer else ""


def _to(peer: str | None) -> str:
    return f" to peer {peer}" if peer else ""


def _who(peer: str | None) -> str:
    return f"peer {peer}" if peer else "the peer"


def _short(text: object, limit: int = 200) -> str:
    # peer-supplied values can be up to a megabyte; keep log lines readable
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class Frame:
    """One received frame; ``length`` is the payload size (for DATA: the raw bytes that follow)."""

    type: MessageType
    length: int
    payload: Mapping[str, Any] = field(default_factory=dict)
    flags: int = 0


# ---------------------------------------------------------------- pure encode / decode


def encode_header(msg_type: MessageType, length: int, flags: int = 0) -> bytes:
    """Pack a frame header."""
    msg_type = MessageType(msg_type)
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"flags {flags:#06x} are not defined in protocol {PROTOCOL_VERSION}")
    limit = MAX_DATA_LENGTH if msg_type is MessageType.DATA else MAX_CONTROL_PAYLOAD
    if not 0 <= length <= limit:
        raise ProtocolError(f"{msg_type.name} payload of {length} bytes exceeds the {limit} limit")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, msg_type, flags, length)


def decode_header(data: bytes | bytearray | memoryview, *, peer: str | None = None) -> Frame:
    """Unpack and check a frame header; the payload of the returned Frame is empty."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(
            f"frame header{_from(peer)} is {len(data)} bytes, expected {HEADER_SIZE}"
        )
    magic, version, type_byte, flags, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(
            f"bad magic {bytes(magic)!r}{_from(peer)}, expected {MAGIC!r}: "
            "the peer is not a memckpt transfer service or the stream is out of step"
        )
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{_who(peer)} speaks protocol version {version}, this side supports "
            f"{PROTOCOL_VERSION}: run the same memckpt version on every node"
        )
    try:
        msg_type = MessageType(type_byte)
    except ValueError:
        raise ProtocolError(f"unknown message type {type_byte}{_from(peer)}") from None
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(
            f"undefined flags {flags:#06x}{_from(peer)} in a protocol {version} "
            f"{msg_type.name} frame"
        )
    return Frame(msg_type, length, {}, flags)


def encode_control_payload(payload: Mapping[str, Any]) -> bytes:
    """JSON-encode a control payload (UTF-8, no NaN), checking the size limit."""
    if not isinstance(payload, Mapping):
        raise ProtocolError(f"a control payload must be a mapping, got {type(payload).__name__}")
    try:
        body = json.dumps(
            dict(payload), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"control payload cannot be encoded as JSON: {e}") from e
    if len(body) > MAX_CONTROL_PAYLOAD:
        raise ProtocolError(
            f"control payload of {len(body)} bytes exceeds the {MAX_CONTROL_PAYLOAD} byte limit"
        )
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def decode_control_payload(
    body: bytes | bytearray | memoryview, *, peer: str | None = None
) -> dict[str, Any]:
    """Decode a control payload: UTF-8 JSON whose top level is an object."""
    try:
        value = json.loads(bytes(body).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"malformed JSON control payload{_from(peer)}: {e}") from None
    if not isinstance(value, dict):
        raise ProtocolError(
            f"control payload{_from(peer)} must be a JSON object, got {type(value).__name__}"
        )
    return value


def encode_frame(msg_type: MessageType, payload: Mapping[str, Any] | None = None) -> bytes:
    """Header plus JSON payload of a control frame (DATA frames: :func:`encode_data_header`)."""
    msg_type = MessageType(msg_type)
    if msg_type is MessageType.DATA:
        raise ProtocolError(
            "DATA frames carry raw bytes: use encode_data_header / send_data_header"
        )
    body = encode_control_payload({} if payload is None else payload)
    return encode_header(msg_type, len(body)) + body


def encode_data_header(nbytes: int) -> bytes:
    """Header of a DATA frame announcing ``nbytes`` raw bytes that follow it."""
    return encode_header(MessageType.DATA, nbytes)


def decode_frame(
    data: bytes | bytearray | memoryview,
    *,
    max_payload: int = MAX_CONTROL_PAYLOAD,
    peer: str | None = None,
) -> Frame:
    """Decode exactly one complete control frame held in ``data``."""
    view = memoryview(data)
    if len(view) < HEADER_SIZE:
        raise ProtocolError(
            f"truncated frame{_from(peer)}: {len(view)} of {HEADER_SIZE} header bytes"
        )
    head = decode_header(view[:HEADER_SIZE], peer=peer)
    if head.type is MessageType.DATA:
        raise ProtocolError(f"unexpected DATA frame{_from(peer)} where a control frame belongs")
    _check_control_length(head, max_payload, peer)
    body = view[HEADER_SIZE:]
    if len(body) != head.length:
        raise ProtocolError(
            f"{head.type.name} frame{_from(peer)} announces {head.length} payload bytes, "
            f"got {len(body)}"
        )
    return Frame(head.type, head.length, decode_control_payload(body, peer=peer), head.flags)


def _check_control_length(head: Frame, max_payload: int, peer: str | None) -> None:
    limit = min(max_payload, MAX_CONTROL_PAYLOAD)
    if head.length > limit:
        raise ProtocolError(
            f"{head.type.name} frame{_from(peer)} announces a {head.length} byte payload, "
            f"over the {limit} byte limit for control messages"
        )


# ---------------------------------------------------------------- requests and paths


def parse_int_field(
    payload: Mapping[str, Any], key: str, *, peer: str | None = None, maximum: int = 2**63 - 1
) -> int:
    """The non-negative integer ``payload[key]`` (not a bool, not above ``maximum``)."""
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise ProtocolError(
            f"field {key!r}{_from(peer)} must be an integer in [0, {maximum}], "
            f"got {_short(repr(value))}"
        )
    return value


def parse_hex_field(
    payload: Mapping[str, Any], key: str, nbytes: int, *, peer: str | None = None
) -> bytes:
    """The ``nbytes``-byte value hex-encoded in ``payload[key]``."""
    value = payload.get(key)
    if not isinstance(value, str) or len(value) != 2 * nbytes or not _HEX_RE.fullmatch(value):
        raise ProtocolError(
            f"field {key!r}{_from(peer)} must be {2 * nbytes} hex digits ({nbytes} bytes)"
        )
    return bytes.fromhex(value)


@dataclass(frozen=True)
class ObjectRef:
    """The object a request names: the data ``rank`` saved at ``step`` of ``job_id``."""

    job_id: str
    step: int
    rank: int

    def __post_init__(self) -> None:
        validate_job_id(self.job_id)
        if isinstance(self.step, bool):  # validate_step would read True as step 1
            raise InvalidNameError(f"step must be an integer, got {self.step!r}")
        object.__setattr__(self, "step", validate_step(self.step))
        _validate_object_rank(self.rank)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], *, peer: str | None = None) -> ObjectRef:
        """The object named by the ``job_id``, ``step`` and ``rank`` fields of a request."""
        try:
            return cls(payload.get("job_id"), payload.get("step"), payload.get("rank"))  # type: ignore[arg-type]
        except InvalidNameError as e:
            raise ProtocolError(
                f"request{_from(peer)} names an invalid object: {_short(e)}"
            ) from None

    def to_payload(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "step": self.step, "rank": self.rank}

    @property
    def relpath(self) -> str:
        return object_relpath(self.job_id, self.step, self.rank)


def _validate_object_rank(rank: object) -> int:
    validate_rank(rank)
    if rank > _MAX_RANK:  # type: ignore[operator]
        raise InvalidNameError(f"rank must be at most {_MAX_RANK}, got {rank}")
    return rank  # type: ignore[return-value]


def object_relpath(job_id: str, step: int, rank: int) -> str:
    """``<job_id>/step-<N>/rank-<R>.mck``, relative to a store's base directory."""
    return JobLayout.relpath(job_id, step, _validate_object_rank(rank))


def resolve_object_path(root: str | os.PathLike[str], job_id: str, step: int, rank: int) -> Path:
    """Absolute path of an object under ``root``; raises if it resolves (symlinks too) outside."""
    return JobLayout(root, job_id).resolve_object(step, _validate_object_rank(rank))


# ---------------------------------------------------------------- authentication


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def make_nonce() -> bytes:
    """A fresh random nonce of NONCE_BYTES bytes."""
    return secrets.token_bytes(NONCE_BYTES)


def generate_secret() -> bytes:
    """A fresh random 32-byte job secret; share it with every rank as ``secret.hex()``."""
    return secrets.token_bytes(32)


def validate_secret(secret: bytes) -> bytes:
    """Return ``secret`` if it is bytes of at least MIN_SECRET_BYTES, else raise."""
    if not isinstance(secret, (bytes, bytearray)):
        raise AuthenticationError(f"the job secret must be bytes, got {type(secret).__name__}")
    if len(secret) < MIN_SECRET_BYTES:
        raise AuthenticationError(
            f"the job secret is {len(secret)} bytes, at least {MIN_SECRET_BYTES} are needed; "
            f"set {SECRET_ENV} to the output of memckpt.transport.protocol.generate_secret().hex()"
        )
    return bytes(secret)


def secret_from_env(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The job secret from ``MEMCKPT_SECRET`` (``SECRET_ENV``), or None if unset or empty.

    A value made only of hex digit pairs is decoded as hex; any other value is used
    as its UTF-8 bytes. Either way the result must be at least 16 bytes.
    """
    value = settings.get(SECRET_ENV, environ)
    if value is None:
        return None
    secret = bytes.fromhex(value) if _HEX_RE.fullmatch(value) else value.encode("utf-8")
    return validate_secret(secret)


def _as_bytes(part: bytes | str | int) -> bytes:
    if isinstance(part, (bytes, bytearray, memoryview)):
        return bytes(part)
    if isinstance(part, str):
        return part.encode("utf-8")
    if isinstance(part, int) and not isinstance(part, bool):
        return str(part).encode("ascii")
    raise TypeError(f"auth tag parts must be bytes, str or int, got {type(part).__name__}")


def auth_tag(secret: bytes, *parts: bytes | str | int) -> bytes:
    """HMAC-SHA256 under ``secret`` of the parts, each prefixed by its u32 length."""
    mac = hmac.new(validate_secret(secret), digestmod=hashlib.sha256)
    for part in parts:
        raw = _as_bytes(part)
        mac.update(struct.pack("!I", len(raw)))
        mac.update(raw)
    return mac.digest()


def verify_tag(secret: bytes, tag: bytes, *parts: bytes | str | int) -> bool:
    """Whether ``tag`` is :func:`auth_tag` of the parts, compared in constant time."""
    return hmac.compare_digest(auth_tag(secret, *parts), bytes(tag))


def server_tag(secret: bytes, job_id: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """Tag the server sends in CHALLENGE to prove it holds the job secret."""
    return auth_tag(secret, SERVER_ROLE, job_id, client_nonce, server_nonce)


def client_tag(secret: bytes, job_id: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """Tag the client sends in AUTH to prove it holds the job secret."""
    return auth_tag(secret, CLIENT_ROLE, job_id, client_nonce, server_nonce)


# ---------------------------------------------------------------- deadlines


class Deadline:
    """An overall time limit for one exchange, holding across all its receives and sends.

    A socket timeout bounds each receive; a peer that sends one byte just inside
    it would otherwise keep an exchange alive forever. Socket helpers given a
    Deadline wait at most until it passes, whatever the socket's own timeout.
    """

    __slots__ = ("at", "budget", "seconds", "what")

    def __init__(self, seconds: float, what: str = "exchange", budget: str = "") -> None:
        self.seconds = max(0.0, float(seconds))
        self.what = what
        self.budget = budget  # how the limit was derived, for the error message
        self.at = time.monotonic() + self.seconds

    @classmethod
    def for_transfer(cls, base_s: float, nbytes: int, min_throughput: float, what: str) -> Deadline:
        """``base_s + nbytes / min_throughput`` seconds from now."""
        budget = (
            f"{base_s:g}s + {nbytes} bytes at {min_throughput / (1 << 20):g} MiB/s"
            if nbytes
            else ""
        )
        return cls(base_s + nbytes / min_throughput, what, budget)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def error(self, peer: str | None, progress: str = "") -> ProtocolError:
        detail = "; ".join(x for x in (self.budget, progress) if x)
        detail = f" ({detail})" if detail else ""
        return ProtocolError(
            f"{self.what}{_with(peer)} missed its deadline of {self.seconds:.1f}s{detail}: "
            "the peer is stalled or slower than the minimum throughput; check that peer, "
            "or raise timeout_s / lower min_throughput"
        )

    def timeout(self, cap: float | None, peer: str | None, progress: str = "") -> float:
        """Seconds the next blocking call may wait: at most ``cap`` and the time left."""
        left = self.remaining()
        if left <= 0:
            raise self.error(peer, progress)
        return left if cap is None else min(cap, left)


def _with(peer: str | None) -> str:
    return f" with peer {peer}" if peer else ""


def _arm(sock: socket.socket, deadline: Deadline | None, cap: float | None, peer: str | None,
         progress: str) -> None:  # fmt: skip
    if deadline is not None:
        sock.settimeout(max(1e-3, deadline.timeout(cap, peer, progress)))


def _timed_out(deadline: Deadline | None, peer: str | None, what: str, progress: str,
               cause: BaseException) -> ProtocolError:  # fmt: skip
    if deadline is not None and deadline.expired():
        err = deadline.error(peer, progress)
    else:
        err = ProtocolError(f"timed out {what}{_from(peer)}: {progress}")
    err.__cause__ = cause
    return err


# ---------------------------------------------------------------- socket helpers


def recv_exact_into(
    sock: socket.socket,
    buf: memoryview,
    *,
    peer: str | None = None,
    deadline: Deadline | None = None,
) -> None:
    """Fill ``buf`` from ``sock``; each receive waits up to the socket's timeout, and all of
    them together end by ``deadline`` when one is given."""
    view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
    total, got = len(view), 0
    cap = sock.gettimeout()
    try:
        while got < total:
            try:
                _arm(sock, deadline, cap, peer, f"{got} of {total} bytes received")
                n = sock.recv_into(view[got:], total - got)
            except TimeoutError as e:
                progress = f"{got} of {total} bytes received"
                raise _timed_out(deadline, peer, "waiting for data", progress, e) from e
            except OSError as e:
                raise ProtocolError(
                    f"connection{_from(peer)} failed after {got} of {total} bytes: {e}"
                ) from e
            if n == 0:
                raise ProtocolError(
                    f"{_who(peer)} closed the connection with {total - got} of {total} bytes "
                    "missing"
                )
            got += n
    finally:
        if deadline is not None:
            sock.settimeout(cap)


def _wait_writable(sock: socket.socket, timeout: float | None) -> bool:
    # poll, not select: select fails on descriptors above FD_SETSIZE (1024)
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000)) or 1))


def sendfile_exact(
    sock: socket.socket,
    fd: int,
    offset: int,
    count: int,
    *,
    peer: str | None = None,
    deadline: Deadline | None = None,
) -> None:
    """Send ``count`` bytes of file ``fd`` from ``offset`` with sendfile(2) (no copy to user space).

    Works on sockets with a timeout (which Python keeps non-blocking): waits for the
    socket to be writable up to that timeout between partial sends, and not past
    ``deadline`` when one is given.
    """
    cap = sock.gettimeout()
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(sock.fileno(), fd, offset + sent, count - sent)
        except BlockingIOError:
            progress = f"{sent} of {count} bytes sent"
            wait = cap if deadline is None else deadline.timeout(cap, peer, progress)
            if not _wait_writable(sock, wait):
                raise _timed_out(deadline, peer, "sending data", f"{sent} of {count} bytes sent",
                                 TimeoutError()) from None  # fmt: skip
            continue
        except OSError as e:
            raise ProtocolError(f"sending data{_to(peer)} failed after {sent} bytes: {e}") from e
        if n == 0:
            raise ProtocolError(f"file ended after {sent} of {count} bytes, sending{_to(peer)}")
        sent += n


def send_frame(
    sock: socket.socket,
    msg_type: MessageType,
    payload: Mapping[str, Any] | None = None,
    *,
    peer: str | None = None,
    deadline: Deadline | None = None,
) -> None:
    """Send one control frame; blocks until sent, the socket times out or ``deadline`` passes."""
    _sendall(sock, encode_frame(msg_type, payload), peer, deadline)


def send_data_header(
    sock: socket.socket, nbytes: int, *, peer: str | None = None, deadline: Deadline | None = None
) -> None:
    """Announce ``nbytes`` raw bytes; the caller sends exactly that many next."""
    _sendall(sock, encode_data_header(nbytes), peer, deadline)


def _sendall(sock: socket.socket, data: bytes, peer: str | None, deadline: Deadline | None) -> None:
    cap = sock.gettimeout()
    try:
        _arm(sock, deadline, cap, peer, f"0 of {len(data)} bytes sent")
        sock.sendall(data)
    except TimeoutError as e:
        raise _timed_out(deadline, peer, f"sending {len(data)} bytes", "not all sent", e) from e
    except OSError as e:
        raise ProtocolError(f"sending {len(data)} bytes{_to(peer)} failed: {e}") from e
    finally:
        if deadline is not None:
            sock.settimeout(cap)


def recv_frame(
    sock: socket.socket,
    max_payload: int = MAX_CONTROL_PAYLOAD,
    *,
    peer: str | None = None,
    max_data: int = 0,
    deadline: Deadline | None = None,
) -> Frame:
    """Receive one frame: a control frame whole, a DATA frame up to the end of its header.

    A DATA frame longer than ``max_data`` (0 by default: DATA not expected) is refused;
    after a DATA frame the caller must read ``frame.length`` bytes with
    :func:`recv_exact_into`. Raises PeerClosedError if the peer closed before a header.
    With ``deadline`` the whole frame must arrive before it passes.
    """
    header = bytearray(HEADER_SIZE)
    view = memoryview(header)
    cap = sock.gettimeout()
    try:
        _arm(sock, deadline, cap, peer, "nothing received yet")
        first = sock.recv_into(view, HEADER_SIZE)
    except TimeoutError as e:
        raise _timed_out(deadline, peer, "waiting for a frame", "nothing received", e) from e
    except OSError as e:
        raise ProtocolError(f"connection{_from(peer)} failed: {e}") from e
    finally:
        if deadline is not None:
            sock.settimeout(cap)
    if first == 0:
        raise PeerClosedError(f"{_who(peer)} closed the connection")
    try:
        recv_exact_into(sock, view[first:], peer=peer, deadline=deadline)
    except ProtocolError as e:
        raise ProtocolError(f"truncated frame header: {e}") from e
    head = decode_header(header, peer=peer)
    if head.type is MessageType.DATA:
        if head.length > max_data:
            raise ProtocolError(
                f"DATA frame{_from(peer)} announces {head.length} bytes, "
                f"{'expected none' if max_data == 0 else f'at most {max_data} were expected'}"
            )
        return head
    _check_control_length(head, max_payload, peer)
    body = bytearray(head.length)
    try:
        recv_exact_into(sock, memoryview(body), peer=peer, deadline=deadline)
    except ProtocolError as e:
        raise ProtocolError(f"truncated {head.type.name} frame: {e}") from e
    frame = Frame(head.type, head.length, decode_control_payload(body, peer=peer), head.flags)
    logger.debug("received %s (%d bytes)%s", frame.type.name, frame.length, _from(peer))
    return frame
