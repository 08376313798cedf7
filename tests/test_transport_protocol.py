"""Wire protocol: framing, bounds, name validation and HMAC authentication, over socketpairs."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from memckpt.errors import InvalidNameError, MemckptError
from memckpt.transport.protocol import (
    HEADER_SIZE,
    MAGIC,
    MAX_CONTROL_PAYLOAD,
    NONCE_BYTES,
    PROTOCOL_VERSION,
    SECRET_ENV,
    AuthenticationError,
    Frame,
    MessageType,
    ObjectRef,
    PeerClosedError,
    ProtocolError,
    auth_tag,
    client_tag,
    decode_frame,
    decode_header,
    encode_frame,
    encode_header,
    generate_secret,
    make_nonce,
    object_relpath,
    parse_hex_field,
    parse_int_field,
    recv_exact_into,
    recv_frame,
    resolve_object_path,
    secret_from_env,
    send_data_header,
    send_frame,
    server_tag,
    verify_tag,
)

PEER = "10.0.0.7:7070"
SECRET = b"0123456789abcdef-job-secret"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def _raw_header(
    magic: bytes = MAGIC,
    version: int = PROTOCOL_VERSION,
    msg_type: int = MessageType.PING,
    flags: int = 0,
    length: int = 0,
) -> bytes:
    return struct.pack("!4sBBHQ", magic, version, msg_type, flags, length)


# ---------------------------------------------------------------- framing round trips

CONTROL_PAYLOADS = {
    MessageType.HELLO: {"job_id": "job-1", "rank": 3, "client_nonce": "ab" * NONCE_BYTES},
    MessageType.CHALLENGE: {"server_nonce": "cd" * NONCE_BYTES, "server_tag": "ef" * 32},
    MessageType.AUTH: {"client_tag": "01" * 32},
    MessageType.AUTH_OK: {},
    MessageType.PUT: {"job_id": "job-1", "step": 100, "rank": 3, "nbytes": 4096},
    MessageType.GET: {"job_id": "job-1", "step": 100, "rank": 3},
    MessageType.LIST: {"job_id": "job-1"},
    MessageType.PING: {},
    MessageType.OK: {"objects": [[100, 3], [200, 3]], "note": "ünïcode"},
    MessageType.ERROR: {"message": "object step-100/rank-3.mck not found"},
}


@pytest.mark.parametrize("msg_type", list(CONTROL_PAYLOADS), ids=lambda t: t.name)
def test_every_control_message_round_trips_over_a_socket(
    pair: tuple[socket.socket, socket.socket], msg_type: MessageType
) -> None:
    sender, receiver = pair

    send_frame(sender, msg_type, CONTROL_PAYLOADS[msg_type], peer=PEER)
    frame = recv_frame(receiver, peer=PEER)

    assert frame.type is msg_type
    assert frame.payload == CONTROL_PAYLOADS[msg_type]
    assert frame.flags == 0


def test_data_frame_announces_raw_bytes_read_straight_into_a_buffer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    blob = os.urandom(300_000)
    destination = bytearray(len(blob))

    def send() -> None:
        send_frame(
            sender, MessageType.PUT, {"job_id": "j", "step": 1, "rank": 0, "nbytes": 300_000}
        )
        send_data_header(sender, len(blob))
        sender.sendall(blob)

    thread = threading.Thread(target=send)
    thread.start()
    request = recv_frame(receiver)
    data = recv_frame(receiver, max_data=request.payload["nbytes"])
    recv_exact_into(receiver, memoryview(destination))
    thread.join()

    assert data.type is MessageType.DATA
    assert data.length == len(blob)
    assert destination == blob


def test_pure_encode_and_decode_agree() -> None:
    raw = encode_frame(MessageType.GET, {"job_id": "j", "step": 7, "rank": 1})

    frame = decode_frame(raw)

    assert raw[:4] == MAGIC
    assert frame == Frame(
        MessageType.GET, len(raw) - HEADER_SIZE, {"job_id": "j", "step": 7, "rank": 1}
    )


def test_header_is_sixteen_bytes_in_network_byte_order() -> None:
    raw = encode_header(MessageType.DATA, 0x010203040506)

    assert raw == b"MCKP\x01\x0b\x00\x00\x00\x00\x01\x02\x03\x04\x05\x06"
    assert decode_header(raw).length == 0x010203040506


# ---------------------------------------------------------------- malformed frames


def test_truncated_header_is_reported_with_missing_bytes_and_peer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    sender.sendall(_raw_header()[:10])
    sender.shutdown(socket.SHUT_WR)

    with pytest.raises(
        ProtocolError, match=rf"truncated frame header.*{PEER}.*6 of 6 bytes missing"
    ):
        recv_frame(receiver, peer=PEER)


def test_truncated_payload_is_reported_with_missing_bytes_and_peer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    sender.sendall(_raw_header(msg_type=MessageType.OK, length=50) + b'{"a":')
    sender.shutdown(socket.SHUT_WR)

    with pytest.raises(ProtocolError, match=rf"truncated OK frame.*{PEER}.*45 of 50 bytes missing"):
        recv_frame(receiver, peer=PEER)


def test_clean_close_between_frames_raises_peer_closed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    sender.shutdown(socket.SHUT_WR)

    with pytest.raises(PeerClosedError, match=f"peer {PEER} closed the connection"):
        recv_frame(receiver, peer=PEER)


def test_huge_announced_length_is_rejected_before_reading_or_allocating(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    sender.sendall(_raw_header(msg_type=MessageType.OK, length=2**60) + b"follow-up")

    with pytest.raises(ProtocolError, match=rf"{PEER}.*1152921504606846976 byte payload.*limit"):
        recv_frame(receiver, peer=PEER)

    # the payload was never read: the bytes after the header are still queued
    assert receiver.recv(100) == b"follow-up"


def test_control_payload_just_over_the_limit_is_rejected() -> None:
    raw = _raw_header(msg_type=MessageType.OK, length=MAX_CONTROL_PAYLOAD + 1)

    with pytest.raises(ProtocolError, match="over the 1048576 byte limit"):
        decode_frame(raw)


def test_caller_can_lower_the_control_payload_limit(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    send_frame(sender, MessageType.OK, {"pad": "x" * 100})

    with pytest.raises(ProtocolError, match="over the 64 byte limit"):
        recv_frame(receiver, max_payload=64)


def test_unexpected_data_frame_is_rejected_without_reading_its_bytes(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    send_data_header(sender, 2**40)

    with pytest.raises(ProtocolError, match=rf"DATA frame from peer {PEER}.*expected none"):
        recv_frame(receiver, peer=PEER)


def test_data_frame_longer_than_announced_is_rejected(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    send_data_header(sender, 101)

    with pytest.raises(ProtocolError, match="101 bytes, at most 100 were expected"):
        recv_frame(receiver, max_data=100)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (_raw_header(magic=b"HTTP"), r"bad magic b'HTTP' from peer 10\.0\.0\.7:7070"),
        (_raw_header(version=2), "peer 10.0.0.7:7070 speaks protocol version 2"),
        (_raw_header(msg_type=0), "unknown message type 0 from peer"),
        (_raw_header(msg_type=200), "unknown message type 200 from peer"),
        (_raw_header(flags=0x8000), "undefined flags 0x8000 from peer"),
    ],
    ids=["bad-magic", "bad-version", "type-zero", "type-200", "unknown-flag"],
)
def test_invalid_header_is_rejected_naming_the_peer(
    pair: tuple[socket.socket, socket.socket], header: bytes, message: str
) -> None:
    sender, receiver = pair
    sender.sendall(header)

    with pytest.raises(ProtocolError, match=message):
        recv_frame(receiver, peer=PEER)


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"\xff\xfe{}", b"[1, 2]", b'"text"', b'{"x": NaN}', b""],
    ids=["syntax", "not-utf8", "array", "string", "nan", "empty"],
)
def test_malformed_json_payload_is_rejected_naming_the_peer(
    pair: tuple[socket.socket, socket.socket], body: bytes
) -> None:
    sender, receiver = pair
    sender.sendall(_raw_header(msg_type=MessageType.OK, length=len(body)) + body)

    with pytest.raises(ProtocolError, match=rf"payload from peer {PEER}"):
        recv_frame(receiver, peer=PEER)


def test_sending_an_oversized_or_unencodable_payload_fails_before_sending() -> None:
    with pytest.raises(ProtocolError, match="exceeds the 1048576 byte limit"):
        encode_frame(MessageType.OK, {"pad": "x" * MAX_CONTROL_PAYLOAD})
    with pytest.raises(ProtocolError, match="cannot be encoded as JSON"):
        encode_frame(MessageType.OK, {"value": float("nan")})
    with pytest.raises(ProtocolError, match="raw bytes"):
        encode_frame(MessageType.DATA, {})


def test_recv_exact_into_names_peer_and_missing_byte_count_on_eof(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    sender.sendall(b"x" * 30)
    sender.close()

    with pytest.raises(ProtocolError, match=rf"peer {PEER} closed.*70 of 100 bytes missing"):
        recv_exact_into(receiver, memoryview(bytearray(100)), peer=PEER)


def test_recv_times_out_with_a_clear_error(pair: tuple[socket.socket, socket.socket]) -> None:
    _, receiver = pair
    receiver.settimeout(0.05)

    with pytest.raises(ProtocolError, match=f"timed out waiting for a frame from peer {PEER}"):
        recv_frame(receiver, peer=PEER)


def test_protocol_errors_are_memckpt_errors() -> None:
    assert issubclass(ProtocolError, MemckptError)
    assert issubclass(PeerClosedError, ProtocolError)
    assert issubclass(AuthenticationError, ProtocolError)


# ---------------------------------------------------------------- object names and paths


def test_object_relpath_is_built_from_validated_parts() -> None:
    assert object_relpath("job-1", 100, 3) == "job-1/step-100/rank-3.mck"


def test_object_ref_round_trips_through_a_request_payload() -> None:
    ref = ObjectRef("job-1", 100, 3)

    parsed = ObjectRef.from_payload(ref.to_payload())

    assert parsed == ref
    assert parsed.relpath == "job-1/step-100/rank-3.mck"


@pytest.mark.parametrize(
    "payload",
    [
        {"job_id": "..", "step": 1, "rank": 0},
        {"job_id": "a/../b", "step": 1, "rank": 0},
        {"job_id": "/etc", "step": 1, "rank": 0},
        {"job_id": "job/1", "step": 1, "rank": 0},
        {"job_id": "a..b", "step": 1, "rank": 0},
        {"job_id": ".hidden", "step": 1, "rank": 0},
        {"job_id": "", "step": 1, "rank": 0},
        {"job_id": "job\x00", "step": 1, "rank": 0},
        {"job_id": 12, "step": 1, "rank": 0},
        {"job_id": "job", "step": -1, "rank": 0},
        {"job_id": "job", "step": 2**63, "rank": 0},
        {"job_id": "job", "step": "1", "rank": 0},
        {"job_id": "job", "step": 1.0, "rank": 0},
        {"job_id": "job", "step": True, "rank": 0},
        {"job_id": "job", "step": "../1", "rank": 0},
        {"job_id": "job", "step": 1, "rank": -1},
        {"job_id": "job", "step": 1, "rank": 10**9},
        {"job_id": "job", "step": 1, "rank": "0"},
        {"job_id": "job", "step": 1},
        {"job_id": "j" * 100_000, "step": 1, "rank": 0},
    ],
)
def test_requests_naming_unsafe_objects_are_rejected(payload: dict) -> None:
    with pytest.raises(
        ProtocolError, match=f"request from peer {PEER} names an invalid object"
    ) as e:
        ObjectRef.from_payload(payload, peer=PEER)

    assert len(str(e.value)) < 400


def test_resolved_object_path_stays_under_the_root(tmp_path: Path) -> None:
    path = resolve_object_path(tmp_path, "job-1", 5, 2)

    assert path == tmp_path.resolve() / "job-1" / "step-5" / "rank-2.mck"


def test_resolving_through_a_symlink_that_leaves_the_root_is_rejected(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "job-1").symlink_to(outside)

    with pytest.raises(InvalidNameError, match="outside the store root"):
        resolve_object_path(root, "job-1", 5, 2)


def test_resolving_an_invalid_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidNameError):
        resolve_object_path(tmp_path, "..", 5, 2)


def test_request_fields_are_parsed_strictly() -> None:
    payload = {"nbytes": 10, "flag": True, "nonce": "00" * 4}

    assert parse_int_field(payload, "nbytes", maximum=10) == 10
    assert parse_hex_field(payload, "nonce", 4) == b"\x00" * 4
    with pytest.raises(ProtocolError, match=f"'nbytes' from peer {PEER}"):
        parse_int_field(payload, "nbytes", maximum=9, peer=PEER)
    with pytest.raises(ProtocolError, match="'flag'"):
        parse_int_field(payload, "flag")
    with pytest.raises(ProtocolError, match="6 hex digits"):
        parse_hex_field(payload, "nonce", 3)
    with pytest.raises(ProtocolError, match="'missing'"):
        parse_hex_field(payload, "missing", 4)


# ---------------------------------------------------------------- authentication


def test_tag_made_with_the_right_secret_verifies() -> None:
    nonce = make_nonce()

    tag = auth_tag(SECRET, b"hello", nonce)

    assert len(tag) == 32
    assert verify_tag(SECRET, tag, b"hello", nonce)


def test_tag_made_with_a_wrong_secret_is_rejected() -> None:
    nonce = make_nonce()

    tag = auth_tag(b"another-secret-of-16+", b"hello", nonce)

    assert not verify_tag(SECRET, tag, b"hello", nonce)


def test_tampered_nonce_is_rejected() -> None:
    nonce = make_nonce()
    tag = auth_tag(SECRET, nonce)

    tampered = bytes([nonce[0] ^ 1]) + nonce[1:]

    assert not verify_tag(SECRET, tag, tampered)


def test_tag_parts_are_length_prefixed_so_boundaries_matter() -> None:
    assert auth_tag(SECRET, b"ab", b"c") != auth_tag(SECRET, b"a", b"bc")


def test_server_tag_cannot_be_replayed_as_client_tag() -> None:
    client_nonce, server_nonce = make_nonce(), make_nonce()

    proof = server_tag(SECRET, "job-1", client_nonce, server_nonce)

    assert proof != client_tag(SECRET, "job-1", client_nonce, server_nonce)


def test_mutual_handshake_over_a_socket_authenticates_both_sides(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    outcome: dict[str, object] = {}

    def serve() -> None:
        hello = recv_frame(server, peer="client")
        cn = parse_hex_field(hello.payload, "client_nonce", NONCE_BYTES)
        sn = make_nonce()
        proof = server_tag(SECRET, hello.payload["job_id"], cn, sn)
        send_frame(
            server, MessageType.CHALLENGE, {"server_nonce": sn.hex(), "server_tag": proof.hex()}
        )
        auth = recv_frame(server, peer="client")
        tag = parse_hex_field(auth.payload, "client_tag", 32)
        outcome["server_accepts"] = verify_tag(
            SECRET, tag, b"memckpt-client-v1", hello.payload["job_id"], cn, sn
        )
        send_frame(server, MessageType.AUTH_OK)

    thread = threading.Thread(target=serve)
    thread.start()
    cn = make_nonce()
    send_frame(client, MessageType.HELLO, {"job_id": "job-1", "rank": 0, "client_nonce": cn.hex()})
    challenge = recv_frame(client, peer="server")
    sn = parse_hex_field(challenge.payload, "server_nonce", NONCE_BYTES)
    proof = parse_hex_field(challenge.payload, "server_tag", 32)
    client_accepts = proof == server_tag(SECRET, "job-1", cn, sn)
    send_frame(client, MessageType.AUTH, {"client_tag": client_tag(SECRET, "job-1", cn, sn).hex()})
    done = recv_frame(client, peer="server")
    thread.join()

    assert client_accepts
    assert outcome["server_accepts"] is True
    assert done.type is MessageType.AUTH_OK


def test_short_secret_is_refused() -> None:
    with pytest.raises(AuthenticationError, match="at least 16"):
        auth_tag(b"short", b"x")


def test_generated_secrets_are_long_and_distinct() -> None:
    first, second = generate_secret(), generate_secret()

    assert len(first) >= 16
    assert first != second
    assert len(make_nonce()) == NONCE_BYTES


def test_secret_from_env_decodes_hex_and_accepts_raw_strings() -> None:
    secret = generate_secret()

    assert secret_from_env({SECRET_ENV: secret.hex()}) == secret
    assert secret_from_env({SECRET_ENV: "a passphrase of some length"}) == (
        b"a passphrase of some length"
    )
    assert secret_from_env({}) is None
    assert secret_from_env({SECRET_ENV: ""}) is None


def test_secret_from_env_rejects_a_short_secret() -> None:
    with pytest.raises(AuthenticationError, match=f"{SECRET_ENV}"):
        secret_from_env({SECRET_ENV: "00ff00ff"})
